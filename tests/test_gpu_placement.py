"""Where pixtral-serve puts decoders and vision workers on a machine's GPUs (the placement alone: no GPU here)."""

from __future__ import annotations

import pytest

from services.gpu_placement import place, visible_gpus
from services.serve_config import ServeConfig


def test_one_decoder_per_gpu_and_vision_beside_them():
    placement = place(["0", "1"], num_decoders=2, num_vision=3)
    assert placement.decoders == (("0", 0.85), ("1", 0.85))
    assert placement.vision == ("0", "1", "0")


def test_decoders_sharing_a_gpu_split_its_memory():
    placement = place(["3"], num_decoders=2, num_vision=1)
    assert placement.decoders == (("3", 0.425), ("3", 0.425))
    assert placement.vision == ("3",)
    uneven = place(["0", "1"], num_decoders=3, num_vision=0)
    assert uneven.decoders == (("0", 0.425), ("1", 0.85), ("0", 0.425))


def test_vision_on_gpus_of_their_own():
    placement = place(["0", "1", "2", "3"], num_decoders=2, num_vision=3, vision="own")
    assert [gpu for gpu, _ in placement.decoders] == ["0", "1"]
    assert placement.vision == ("2", "3", "2")
    with pytest.raises(ValueError, match="needs a GPU without a decoder"):
        place(["0", "1"], num_decoders=2, num_vision=1, vision="own")


def test_no_gpu_and_an_unknown_placement_are_refused():
    with pytest.raises(ValueError, match="no GPU"):
        place([], num_decoders=1, num_vision=1)
    with pytest.raises(ValueError, match="--vision-gpus"):
        place(["0"], num_decoders=1, num_vision=1, vision="alone")
    with pytest.raises(ValueError, match="--vision-gpus"):
        ServeConfig(vision_gpus="alone")


def test_the_gpus_come_from_the_flag_then_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ["2", "5"]
    assert visible_gpus("1,0") == ["1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_a_child_is_started_with_its_gpu_in_its_environment(tmp_path):
    import sys

    from services.launcher import Launcher
    from services.supervisor import WORKER_STAGE, ChildSpec
    launcher = Launcher(ServeConfig(auth_token="secret"), log_dir=tmp_path)
    probe = ("import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['PIXTRAL_AUTH_TOKEN'])",)
    process = launcher.spawn(ChildSpec("probe", (sys.executable, "-c", *probe), WORKER_STAGE,
                                       (("CUDA_VISIBLE_DEVICES", "7"),)))
    assert process.wait(timeout=60) == 0
    launcher._logs["probe"].close()
    assert (tmp_path / "probe.log").read_text().split() == ["7", "secret"]
