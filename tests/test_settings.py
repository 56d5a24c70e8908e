"""Config: flags over PIXTRAL_* environment over defaults; bad values name the flag."""

from __future__ import annotations

import pytest

from services.decoder.config import DecoderConfig
from services.gateway.config import GatewayConfig
from services.vision.config import VisionConfig
from shared.settings import load_config, to_argv


def test_flags_win_over_environment_which_wins_over_defaults():
    env = {"PIXTRAL_PORT": "7000", "PIXTRAL_MAX_NUM_SEQS": "3", "PIXTRAL_CUDA_GRAPHS": "false"}
    config = load_config(DecoderConfig, ["--port", "7001"], env)
    assert (config.port, config.max_num_seqs, config.cuda_graphs) == (7001, 3, False)
    assert config.block_size == DecoderConfig.block_size


def test_tuples_are_comma_separated_and_round_trip():
    config = load_config(GatewayConfig, ["--decoder-addresses", "a:1, b:2"], {})
    assert config.decoder_addresses == ("a:1", "b:2")
    assert load_config(GatewayConfig, to_argv(config), {}) == config


def test_invalid_values_exit_with_the_flag_named(capsys):
    with pytest.raises(SystemExit):
        load_config(DecoderConfig, ["--device", "tpu"], {})
    assert "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(DecoderConfig, [], {"PIXTRAL_PORT": "eighty"})
    assert "PIXTRAL_PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(GatewayConfig, ["--embedding-ttl-s", "-1"], {})
    assert "--embedding-ttl-s must not be negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(VisionConfig, ["--max-cuda-graphs", "-1"], {})
    assert "--max-cuda-graphs not negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(DecoderConfig, ["--switch-interval-ms", "-0.5"], {})
    assert "--switch-interval-ms must not be negative" in capsys.readouterr().err
