"""Forward + backward time of the MLP non-linearities on this machine: tanh GELU (the GPT-2 default), exact GELU, ReLU^2.

    python bench/activations.py          # (16, 256, 1536): the lecture model's MLP activations at micro-batch 16

Prints min and median of 7 timings per activation and dtype, with torch's current thread count.
"""

import time

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu exact": F.gelu,
    "relu^2": lambda x: F.relu(x).square(),
}


def main() -> None:
    x0 = torch.randn(16, 256, 1536)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x0.shape)}")
    print("| dtype | activation | min ms | median ms |\n|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for name, f in ACTIVATIONS.items():
            times = []
            for _ in range(7):
                x = x0.to(dtype).requires_grad_()
                start = time.perf_counter()
                f(x).sum().backward()
                times.append(time.perf_counter() - start)
            times.sort()
            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {times[0] * 1e3:.1f} | {times[3] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
