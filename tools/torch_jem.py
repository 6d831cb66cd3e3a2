"""A minimal PyTorch JEM iteration: the same-machine baseline of `tools.bench --model torch_jem`.

Written for the benchmark (not taken from the reference code) to reproduce the cost structure of
the PyTorch JEM reference on CPU: the JEM-family Wide-ResNet (pre-activation blocks, LeakyReLU
0.2, convolutions with bias, stride on the second convolution, no normalisation, NCHW), SGLD with
step size 1 and noise 0.01 on `logsumexp(f(x))` over K steps from a 10000-chain replay buffer
(5% restarts from uniform noise), then `CE(f(x_lab), y) - (mean lse f(x_p_d) - mean lse f(x_q))`
and one Adam step. With `streams == "two"` (the reference's setting) `x_lab` and `x_p_d` are
different batches (three forward passes in the loss); with `"one"` they are the same batch.

Run by `tools/bench.py` as `python tools/torch_jem.py CONFIG_JSON` in a Python that has torch;
prints one `BENCH_RESULT {...}` line with the same keys as the TensorFlow rows.
"""

import json
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench

RESULT_PREFIX = "BENCH_RESULT "


def build_wide_resnet(torch, depth, width, in_channels, num_classes):
    nn = torch.nn
    functional = torch.nn.functional

    class Block(nn.Module):
        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
            self.shortcut = None
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)

        def forward(self, x):
            h = self.conv1(functional.leaky_relu(x, 0.2))
            h = self.conv2(functional.leaky_relu(h, 0.2))
            return h + (x if self.shortcut is None else self.shortcut(x))

    class WideResNet(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 4) // 6
            widths = [16, 16 * width, 32 * width, 64 * width]
            self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=True)
            blocks = []
            in_planes = 16
            for planes, stride in zip(widths[1:], (1, 2, 2)):
                for index in range(n):
                    blocks.append(Block(in_planes, planes, stride if index == 0 else 1))
                    in_planes = planes
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(widths[-1], num_classes)

        def forward(self, x):
            h = functional.leaky_relu(self.blocks(self.stem(x)), 0.2)
            return self.head(h.mean(dim=(2, 3)))

    return WideResNet()


def run(config):
    import torch

    if config.get("threads"):
        inter, intra = config["threads"]
        if intra:
            torch.set_num_threads(intra)
        if inter:
            torch.set_num_interop_threads(inter)
    backbone = config["backbone"]
    if not backbone.startswith("wrn-"):
        return {"status": "not available",
                "error": f"the PyTorch baseline implements WRN backbones only, not {backbone}"}
    if config.get("mixed_precision") or config.get("norm") not in (None, "none"):
        return {"status": "not available",
                "error": "the PyTorch baseline runs float32 without normalisation only"}
    depth, width = (int(v) for v in backbone.split("-")[1:])
    batch, size, channels = config["batch_size"], config["image_size"], config["channels"]
    num_classes, num_steps = config["num_classes"], int(config["num_steps"])
    torch.manual_seed(0)
    result = {"status": "ok", "torch_version": torch.__version__,
              "torch_threads": torch.get_num_threads(), "num_replicas": 1}
    model = build_wide_resnet(torch, depth, width, channels, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    buffer = torch.rand(config["buffer_size"], channels, size, size) * 2 - 1
    x_lab = torch.rand(batch, channels, size, size) * 2 - 1
    y_lab = torch.randint(0, num_classes, (batch,))
    x_p_d = torch.rand(batch, channels, size, size) * 2 - 1 if config["streams"] == "two" else (
        x_lab)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["buffer_mb"] = round(buffer.numel() * 4 / 2**20, 1)

    def sgld(x):
        for _ in range(num_steps):
            x = x.detach().requires_grad_(True)
            energy_gradient = torch.autograd.grad(model(x).logsumexp(1).sum(), [x])[0]
            x = x + energy_gradient + 0.01 * torch.randn_like(x)
        return x.detach()

    def sample_q():
        indices = torch.randint(0, buffer.shape[0], (batch,))
        start = buffer[indices]
        fresh = torch.rand_like(start) * 2 - 1
        restart = (torch.rand(batch) < 0.05).float()[:, None, None, None]
        start = restart * fresh + (1 - restart) * start
        samples = sgld(start)
        buffer[indices] = samples
        return samples

    def iteration():
        x_q = sample_q()
        logits = model(x_lab)
        loss = torch.nn.functional.cross_entropy(logits, y_lab)
        fp = (logits if x_p_d is x_lab else model(x_p_d)).logsumexp(1).mean()
        fq = model(x_q).logsumexp(1).mean()
        loss = loss - (fp - fq)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    model.train()
    start = time.perf_counter()
    iteration()
    result["first_iteration_s"] = round(time.perf_counter() - start, 3)
    for _ in range(max(config["warmup"] - 1, 0)):
        iteration()
    wall, cpu, walls = bench.timed(iteration, config["iterations"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result.update(iteration_s=wall, iteration_cpu_s=cpu,
                  iteration_all_s=[round(v, 4) for v in walls],
                  images_per_s=batch / wall, peak_rss_mb=round(peak, 1))

    def standalone():
        for _ in range(num_steps):
            x = x_lab.detach().requires_grad_(True)
            torch.autograd.grad(model(x).logsumexp(1).sum(), [x])

    def classifier_step(x, y):
        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    functions = {"iteration": iteration, "sampler": lambda: sgld(x_lab)}
    loss_images = batch * (3 if config["streams"] == "two" else 2)
    if config["references"]:
        x_big = torch.rand(loss_images, channels, size, size) * 2 - 1
        y_big = torch.randint(0, num_classes, (loss_images,))
        functions.update(standalone=standalone, classifier=classifier_step(x_lab, y_lab),
                         classifier_loss_batch=classifier_step(x_big, y_big))
        for fn in functions.values():
            fn()
    timings = bench.interleaved_timings(functions, config["ref_iterations"])
    result.update(bench.reference_results(timings, num_steps, loss_images))
    return result


def main():
    config = json.loads(sys.argv[1])
    try:
        result = run(config)
    except Exception as error:  # noqa: BLE001 (reported in the benchmark table)
        import traceback

        traceback.print_exc()
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    result = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
              for k, v in result.items()}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
