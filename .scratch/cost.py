import time, torch, torch.nn.functional as F, sys
from descent.data import MNISTDataModule
from descent.nets import MLP
from descent.measure import curvature_noise as cn
from descent.measure.noise import measure_with_error
torch.manual_seed(0)
n = int(sys.argv[1]); hidden = [int(h) for h in sys.argv[2].split(",")]
dm = MNISTDataModule(root="data", download=False, val_size=10000, limit_train=n, batch_size=128, seed=0)
dm.setup("fit")
x, y = dm.x_train, dm.y_train
net = MLP(hidden=hidden, in_features=784, classes=10)
opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
t = time.perf_counter()
for i in range(0, n - 127, 128):
    opt.zero_grad(); F.cross_entropy(net(x[i:i+128]), y[i:i+128]).backward(); opt.step()
epoch = time.perf_counter() - t
def timed(f):
    t = time.perf_counter(); r = f(); return time.perf_counter() - t, r
ts, r0 = timed(lambda: measure_with_error(net, x, y, 32))
th, r1 = timed(lambda: cn.b_noise_with_error(net, F.cross_entropy, x, y, 4096, 32))
tp, r2 = timed(lambda: cn.b_precond_with_error(net, F.cross_entropy, x, y, cn.diagonal_preconditioner(opt), 32))
print(f"n={n} hidden={hidden} threads={torch.get_num_threads()}: epoch (B=128 rmsprop) {epoch:.2f} s; per crossing: "
      f"B_simple {ts:.2f} s, B_noise {th:.2f} s, B_precond {tp:.2f} s")
print(r0["b_simple"], r0["b_simple_se"], r1["ratio"], r1["se"], r2["b_precond"], r2["b_precond_se"])
