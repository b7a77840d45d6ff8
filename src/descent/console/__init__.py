"""console/: what the terminal shows: the start line, the examples bar, the closing block, the log filters."""
