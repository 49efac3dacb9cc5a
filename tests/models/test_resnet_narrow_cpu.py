"""A narrow CIFAR ResNet-18 (width < 8) trains on CPU in channels_last.

oneDNN's AVX2 weight-gradient kernel for a 1x1 stride-2 channels_last convolution with
fewer than 8 input channels hangs or segfaults (engine/models/resnet.py); on an AVX2-only
CPU this test fails without the shortcut's NCHW path. It runs in a child process with a
timeout because the failure is a hang or a crash, and checks the gradients against the
same net in float64 NCHW, which takes none of oneDNN's channels_last kernels.
"""
from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import copy, torch
from engine.models.resnet import CifarResNet18
torch.manual_seed(0)
net = CifarResNet18(width=4)
oracle = copy.deepcopy(net).double()
net = net.to(memory_format=torch.channels_last)
x = torch.randn(8, 3, 32, 32)
for _ in range(2):  # the hang, where it happens, comes on the first or second backward
    net.zero_grad()
    net(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
oracle(x.double()).square().sum().backward()
oracle.zero_grad()
oracle(x.double()).square().sum().backward()
for (name, p), q in zip(net.named_parameters(), oracle.parameters()):
    # float32 against float64: within 1e-3 of the tensor's largest gradient.
    err, scale = float((p.grad.double() - q.grad).abs().max()), float(q.grad.abs().max())
    assert err <= 1e-3 * scale, (name, err, scale)
print("gradients match")
"""


def test_width_4_resnet_backward_on_cpu_channels_last():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "gradients match" in proc.stdout
