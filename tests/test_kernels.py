"""The CUDA path's Triton kernels against plain PyTorch, run by Triton's interpreter on the CPU."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT, child_env


def test_triton_kernels_match_pytorch_under_the_interpreter():
    result = subprocess.run([sys.executable, "-m", "tests.kernel_checks"], cwd=ROOT,
                            env=child_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("ok   ") == 11, result.stdout
    # these run on CUDA machines only
    assert "n/a  check_cuda_graph_decode_matches_eager" in result.stdout
    assert "n/a  check_prefill_chunk_attention_matches_a_mask" in result.stdout
    assert "n/a  check_vision_graphs_match_eager" in result.stdout
