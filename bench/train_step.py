"""Training-step benchmark: framework overhead, and MoEUT against its dense baseline.

    python bench/train_step.py [--steps 11] [--compile]   # CPU, 1 process
    python bench/train_step.py --gpu           # one CUDA GPU, bf16; imports only torch + triton

CPU (fp32, PyTorch expert path):

1. Framework overhead at the tiny and MoEUT-44M profiles: one step of `moeut train`'s
   `train_step` (DeepSpeed ZeRO-1 engine, 1 process, losses kept on the device) against a bare
   forward + backward + clipping + `torch.optim.AdamW` step of the same model on the same
   batches. The two alternate step by step, the order reversing every step (`alternating`), so
   that the shared machine's load hits both alike; the overhead is the ratio of their medians,
   and paired, the median of each step's own ratio (goal ≤ 1.10). Data loading is not part of
   either.
2. MoEUT-44M against dense-44M: tokens/s of forward + backward, alternating step by step, and
   the activation bytes per token autograd keeps for backward (weights not counted), as ratios
   in one run.
3. With `--compile`: MoEUT eager against `model.compile: true` at the tiny and 44M profiles,
   forward + backward alternating step by step, and the seconds of the first compiled step
   (tracing and inductor's C++ builds).

GPU (`--gpu`): MoEUT-244M with the Triton kernels and with the PyTorch path, and dense-244M, in
bf16 autocast over fp32 weights with AdamW: tokens/s, MFU against the device's bf16 peak
(`--peak-tflops`, default the H200's 989), and peak memory.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from alternating import alternating_seconds, paired_ratio

from moeut_dist import DenseLM, MoEUTConfig, MoEUTLM, arch, profiles
from moeut_dist.activation_memory import SavedTensorBytes
from moeut_dist.host_memory import keep_freed_memory
from moeut_dist.model import lm_loss

LR, GRAD_CLIP = 2.5e-4, 0.25


def random_batches(vocab: int, batch: int, seq_len: int, device: str = "cpu") -> Iterator:
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(vocab, (batch, seq_len + 1), generator=generator).to(device)


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor):
    output = model(tokens[:, :-1])
    loss = lm_loss(output.logits, tokens[:, 1:])
    if hasattr(output, "reg_loss"):
        loss = loss + output.reg_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def framework_overhead(
    profile: str, batch: int, seq_len: int, steps: int
) -> dict[str, list[float]]:
    """Seconds of moeut train's step ("train_step") and of the bare step ("bare") at `profile`,
    alternating step by step."""
    from moeut_dist.parallel.build import build_model
    from moeut_dist.parallel.engine import create_engine
    from moeut_dist.parallel.layout import ParallelConfig, initialize
    from moeut_dist.train import loop
    from moeut_dist.train.config import OptimSection, RunPlan

    config = MoEUTConfig.from_profile(profile, kernel="torch")
    parallel = ParallelConfig(zero_stage=1)
    plan = RunPlan(config, data_parallel=1, grad_accumulation=1)
    with loop.distributed_session():
        initialize(parallel, config)
        engine = create_engine(
            build_model(config, parallel, seed=0),
            parallel,
            OptimSection(lr=LR, grad_clip=GRAD_CLIP),
            batch,
            bf16=False,
        )
        torch.manual_seed(0)
        bare = MoEUTLM(config).train()
        optimizer = torch.optim.AdamW(bare.parameters(), lr=LR, weight_decay=0.01)
        engine_batches = random_batches(config.vocab_size, batch, seq_len)
        bare_batches = random_batches(config.vocab_size, batch, seq_len)
        return alternating_seconds(
            {
                "train_step": lambda: loop.train_step(engine, engine_batches, plan),
                "bare": lambda: bare_step(bare, optimizer, next(bare_batches)),
            },
            steps,
        )


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters excluded."""
    with SavedTensorBytes(model.parameters()) as saved:
        output = model(tokens[:, :-1])
        loss = lm_loss(output.logits, tokens[:, 1:])
    del output, loss
    return saved.bytes


def forward_backward(model: torch.nn.Module, batches: Iterator) -> None:
    tokens = next(batches)
    output = model(tokens[:, :-1])
    lm_loss(output.logits, tokens[:, 1:]).backward()
    model.zero_grad(set_to_none=True)


def alternating_forward_backward(
    models: dict[str, torch.nn.Module], batches: Iterator, steps: int
) -> dict[str, list[float]]:
    """Seconds of each model's forward + backward in each of `steps` rounds, alternating."""
    rounds = {
        name: functools.partial(forward_backward, model, batches) for name, model in models.items()
    }
    return alternating_seconds(rounds, steps)


def cpu(steps: int) -> None:
    kept = keep_freed_memory()  # as `moeut train` does on CPUs, for both sides
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"freed memory {'kept' if kept else 'returned'}; {steps} rounds, alternating"
    )
    print(
        "\nFramework overhead: moeut train step / bare fwd + bwd + AdamW (goal ≤ 1.10), by "
        "medians and paired"
    )
    print(f"{'profile':<10} {'tokens':>7} {'train_step s':>12} {'bare s':>8} {'ratio':>6} "
          f"{'paired':>6}")  # fmt: skip
    for profile, batch, seq_len in (("tiny", 16, 128), ("moeut-44m", 2, 256)):
        times = framework_overhead(profile, batch, seq_len, steps)
        full, bare = (statistics.median(times[name]) for name in ("train_step", "bare"))
        paired = paired_ratio(times["train_step"], times["bare"])
        print(f"{profile:<10} {batch * seq_len:>7} {full:>12.3f} {bare:>8.3f} {full / bare:>6.2f} "
              f"{paired:>6.2f}")  # fmt: skip

    print("\nMoEUT-44M against dense-44M: forward + backward, fp32, batch 2 × 256")
    print(f"{'model':<10} {'tokens/s':>9} {'activation MB/token':>20}")
    models = {}
    for name, build in (
        ("moeut-44m", lambda: MoEUTLM(MoEUTConfig.from_profile("moeut-44m", kernel="torch"))),
        ("dense-44m", lambda: DenseLM(profiles.get_dense("dense-44m"))),
    ):
        torch.manual_seed(0)
        models[name] = build().train()
    batches = random_batches(models["moeut-44m"].config.vocab_size, 2, 256)
    times = alternating_forward_backward(models, batches, steps)
    speed = {name: 2 * 256 / statistics.median(times[name]) for name in models}
    memory = {
        name: saved_activation_bytes(m, next(batches)) / (2 * 256) for name, m in models.items()
    }
    for name in models:
        print(f"{name:<10} {speed[name]:>9.0f} {memory[name] / 1e6:>20.3f}")
    print(
        f"ratio moeut/dense: tokens/s {speed['moeut-44m'] / speed['dense-44m']:.2f} (paired "
        f"{paired_ratio(times['dense-44m'], times['moeut-44m']):.2f}), activation memory per "
        f"token {memory['moeut-44m'] / memory['dense-44m']:.2f}"
    )


def eager_against_compiled(steps: int) -> None:
    print("\nMoEUT eager against model.compile: true: forward + backward, fp32")
    print(f"{'profile':<10} {'tokens':>7} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} "
          f"{'paired':>6} {'first compiled step s':>21}")  # fmt: skip
    for profile, batch, seq_len in (("tiny", 16, 128), ("moeut-44m", 2, 256)):
        models = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            config = MoEUTConfig.from_profile(profile, kernel="torch", compile=compiled)
            models["compiled" if compiled else "eager"] = MoEUTLM(config).train()
        batches = random_batches(models["eager"].config.vocab_size, batch, seq_len)
        started = time.perf_counter()
        forward_backward(models["compiled"], batches)
        first = time.perf_counter() - started
        times = alternating_forward_backward(models, batches, steps)
        eager, compiled = (statistics.median(times[name]) for name in ("eager", "compiled"))
        paired = paired_ratio(times["eager"], times["compiled"])
        print(f"{profile:<10} {batch * seq_len:>7} {eager:>8.3f} {compiled:>10.3f} "
              f"{eager / compiled:>8.2f} {paired:>6.2f} {first:>21.1f}")  # fmt: skip


def gpu(steps: int, peak_tflops: float, batch: int, seq_len: int) -> None:
    device = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, AdamW")
    print(f"batch {batch} × {seq_len}; MFU against {peak_tflops:.0f} TFLOP/s")
    print(f"{'model':<22} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'step s':>7}")
    cases: list[tuple[str, Callable[[], torch.nn.Module], float]] = []
    for kernel in ("triton", "torch"):
        config = MoEUTConfig.from_profile("moeut-244m", kernel=kernel)
        flops = arch.of(config).summary(config, seq_len).training_flops_per_token
        cases.append((f"moeut-244m ({kernel})", lambda c=config: MoEUTLM(c), flops))
    dense = profiles.get_dense("dense-244m")
    dense_flops = arch.of(dense).summary(dense, seq_len).training_flops_per_token
    cases.append(("dense-244m", lambda: DenseLM(dense), dense_flops))
    for name, build, flops_per_token in cases:
        torch.manual_seed(0)
        model = build().to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
        batches = random_batches(model.config.vocab_size, batch, seq_len, device)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(steps + 2):  # two warm-up steps: autotuning, allocator
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                bare_step(model, optimizer, next(batches))
            torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        tokens_per_second = batch * seq_len / seconds
        mfu = tokens_per_second * flops_per_token / (peak_tflops * 1e12)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name:<22} {tokens_per_second:>9.0f} {mfu:>6.3f} {peak:>9.1f} {seconds:>7.3f}")
        del model, optimizer
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="CPU mode: also eager against model.compile"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--batch", type=int, default=16, help="GPU mode: sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024, help="GPU mode")
    args = parser.parse_args()
    if args.gpu:
        gpu(args.steps, args.peak_tflops, args.batch, args.seq_len)
    else:
        cpu(args.steps)
        if args.compile:
            eager_against_compiled(args.steps)


if __name__ == "__main__":
    main()
