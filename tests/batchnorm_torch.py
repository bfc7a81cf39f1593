# Prints torch.nn.BatchNorm2d's numbers for test_batchnorm.cc: one line per tensor,
# "name v0 v1 ...", float64. Two training steps (the second on 2x + 1), the input
# and parameter gradients of the first, then eval on x.
import torch

torch.manual_seed(0)
N, C, H, W = 3, 4, 5, 3
x = torch.randn(N, C, H, W, dtype=torch.float64)
bn = torch.nn.BatchNorm2d(C, eps=1e-5, momentum=0.1).double()
with torch.no_grad():
    bn.weight.copy_(torch.randn(C, dtype=torch.float64))
    bn.bias.copy_(torch.randn(C, dtype=torch.float64))
dy = torch.randn(N, C, H, W, dtype=torch.float64)


def emit(name, t):
    print(name, " ".join(repr(float(v)) for v in t.detach().reshape(-1)))


emit("x", x)
emit("weight", bn.weight)
emit("bias", bn.bias)
emit("dy", dy)
bn.train()
xr = x.clone().requires_grad_(True)
y1 = bn(xr)
y1.backward(dy)
emit("y_train", y1)
emit("dx", xr.grad)
emit("dweight", bn.weight.grad)
emit("dbias", bn.bias.grad)
emit("running_mean1", bn.running_mean)
emit("running_var1", bn.running_var)
y2 = bn(2 * x + 1)
emit("y_train2", y2)
emit("running_mean2", bn.running_mean)
emit("running_var2", bn.running_var)
bn.eval()
emit("y_eval", bn(x))
