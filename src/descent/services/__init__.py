"""services/: the processes descent starts on this machine: tracking server, Ray and SLURM clusters, the UI, Debian packages."""
