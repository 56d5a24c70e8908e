"""The sampler's cost per decode step over the real 131,072-token vocabulary, at batch 1, 32 and 64, beside the
sampler it replaced (read from git at `--before-rev`, into a temporary module, in the same run).

    python -m bench.sampler                   # CPU
    python -m bench.sampler --device cuda     # GPU

Cases: greedy; temperature 0.8 + top-p 0.9; + top-k 50; + repetition/presence/frequency penalties and 10 logit
biases (512 prompt and 64 output tokens a row); temperature + top-p with logprobs and 5 top logprobs; and top-p
over flat rows, where the best candidates never hold the mass and every row takes the vocabulary's path.
The logits are Zipf-like (p ~ rank^-1.5, shuffled over the ids, as a language model's next-token distribution:
the top 256 tokens hold ~95% of the mass), except in the flat case (standard normal logits).
Each figure is the median of `--repeats` steps (after a warm-up) and counts building the batch's parameter
tensors on the host and sampling; the old sampler has no penalties or logprobs, so those cases have no
before figure. Results: $OUT/{cpu,gpu}_sampler.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import gpu_name, save, timed
from services.decoder.sampler import sample
from services.decoder.sampling_batch import SamplingBatch, SamplingRow
from shared.sampling import SamplingParams

VOCAB_SIZE = 131072
EOS = 2
BATCH_SIZES = (1, 32, 64)
BEFORE_REV = "6053d93"   # the last commit with the sorting sampler


def load_before(rev: str, file: str = ""):
    """The sampler as it was at `rev` (or as `file` holds it, where the checkout has no git history), imported from
    a temporary file; None where git cannot show it."""
    try:
        source = Path(file).read_text() if file else subprocess.run(
            ["git", "show", f"{rev}:services/decoder/sampler.py"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"no before figures: git show {rev} failed ({error})", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as folder:   # once executed, the module no longer needs its file
        path = Path(folder) / "sampler_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("sampler_before", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def zipf_logits(batch_size: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    rank = torch.arange(1, VOCAB_SIZE + 1, dtype=torch.float32)
    rows = []
    for _ in range(batch_size):
        row = -1.5 * rank.log() + 0.1 * torch.randn(VOCAB_SIZE, generator=generator)
        rows.append(row[torch.randperm(VOCAB_SIZE, generator=generator)])
    return torch.stack(rows).to(device)


def cases() -> dict[str, SamplingParams]:
    top_p = SamplingParams(256, temperature=0.8, top_p=0.9, seed=1)
    top_k = SamplingParams(256, temperature=0.8, top_p=0.9, top_k=50, seed=1)
    return {
        "greedy": SamplingParams(256),
        "top_p": top_p,
        "top_p_top_k": top_k,
        "penalties_bias": SamplingParams(256, temperature=0.8, top_p=0.9, top_k=50, seed=1,
                                         repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3,
                                         logit_bias=tuple((1000 + 97 * i, 1.5) for i in range(10))),
        "logprobs_5": SamplingParams(256, temperature=0.8, top_p=0.9, seed=1, logprobs=True, top_logprobs=5),
        "top_p_flat": top_p,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--before-file", default="", help="the old sampler's source file, instead of git show")
    args = parser.parse_args()
    device = torch.device(args.device)
    before = load_before(args.before_rev, args.before_file)
    generator = torch.Generator().manual_seed(0)
    results: dict[str, object] = {"device": gpu_name() if device.type == "cuda" else "cpu",
                                  "torch_threads": torch.get_num_threads(), "vocab_size": VOCAB_SIZE}
    for batch_size in BATCH_SIZES:
        zipf = zipf_logits(batch_size, device, generator)
        flat = torch.randn(batch_size, VOCAB_SIZE, generator=generator).to(device)
        prompts = [torch.randint(3, VOCAB_SIZE, (512,), generator=generator).tolist() for _ in range(batch_size)]
        outputs = [torch.randint(3, VOCAB_SIZE, (64,), generator=generator).tolist() for _ in range(batch_size)]
        for name, params in cases().items():
            logits = flat if name == "top_p_flat" else zipf
            rows = [SamplingRow(params, prompt, output) for prompt, output in zip(prompts, outputs)]

            def after():
                return sample(logits, SamplingBatch.build(rows, VOCAB_SIZE, EOS, device)).token_ids

            results[f"b{batch_size}_{name}_ms"] = timed(after, args.repeats) * 1e3
            if before is not None and name in ("greedy", "top_p", "top_p_top_k", "top_p_flat"):
                steps = [len(output) for output in outputs]

                def previous():
                    return before.sample(logits, before.SamplingBatch.build([params] * batch_size, steps, device))

                results[f"b{batch_size}_{name}_before_ms"] = timed(previous, args.repeats) * 1e3
    save(f"{'gpu' if device.type == 'cuda' else 'cpu'}_sampler", results)


if __name__ == "__main__":
    main()
