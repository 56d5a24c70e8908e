"""Checkpoints in Mistral's own layout (params.json, consolidated*.safetensors, tekken.json) are read as their Hugging
Face conversion: the same config, tensors, outputs and fingerprints, and what Mistral's own RoPE convention computes
on the unconverted tensors; the checkpoint's own tekken.json is the tokenizer the stack uses."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file, save_file

from pixtral.v1 import gateway_pb2_grpc
from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache, PrefillSpan
from services.decoder.weights import load_decoder
from services.decoder.ops import TorchOps
from services.vision.encoder import load_vision_encoder
from shared import checkpoint, mistral_layout, tokenizer
from shared.fingerprints import decoder_fingerprint, vision_fingerprint
from shared.tiny import make_tiny, pixtral_12b_config
from tests.reference import chat_request
from tests.support import ROOT, Stack, child_env, image_bytes, noise_image

CPU = torch.device("cpu")
SEED = 3

# mistralai/Pixtral-12B-2409's params.json as published.
PIXTRAL_12B_PARAMS = {
    "dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072,
    "vision_encoder": {"hidden_size": 1024, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                       "rope_theta": 10000.0, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_token_id": 10, "image_break_token_id": 12,
                       "image_end_token_id": 13},
}


def make_checkpoint(directory: Path, *flags: str) -> Path:
    """Through the console script, as users make one (python -m when it is not on PATH)."""
    script = Path(sys.executable).parent / "pixtral-make-tiny"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "shared.tiny"]
    subprocess.run([*command, str(directory), *flags], check=True, cwd=ROOT, env=child_env(),
                   stdout=subprocess.DEVNULL)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("formats") / "hf", seed=SEED)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("formats") / "mistral", "--seed", str(SEED), "--format", "mistral")


@pytest.fixture(scope="module")
def mistral_sharded_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("formats") / "mistral3", seed=SEED, num_shards=3, layout="mistral")


def raw_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by its name in its files."""
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# -- config and files ---------------------------------------------------------------------------------------------

def test_pixtral_12b_params_json_gives_the_config_of_its_hf_conversion(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(PIXTRAL_12B_PARAMS))
    config = checkpoint.load_config(tmp_path)
    expected = pixtral_12b_config()
    assert config.text_config.to_dict() == expected.text_config.to_dict()
    assert config.vision_config.to_dict() == expected.vision_config.to_dict()
    assert config.to_dict() == expected.to_dict()
    assert config.text_config.max_position_embeddings == 1024000   # as mistral-community/pixtral-12b has it
    assert mistral_layout.params_from_config(expected) == PIXTRAL_12B_PARAMS


def test_the_tiny_checkpoint_in_mistral_s_layout(mistral_dir, hf_dir):
    assert sorted(path.name for path in mistral_dir.iterdir()) == [
        "consolidated.safetensors", "params.json", "tekken.json"]
    assert checkpoint.is_mistral_layout(mistral_dir) and not checkpoint.is_mistral_layout(hf_dir)
    keys = set(raw_tensors(mistral_dir))
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.1.attention.wq.weight",
            "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight", "vision_encoder.patch_conv.weight",
            "vision_encoder.ln_pre.weight", "vision_encoder.transformer.layers.1.attention.wk.weight",
            "vision_encoder.transformer.layers.0.feed_forward.w2.weight", "vision_language_adapter.w_in.bias",
            "vision_language_adapter.w_out.weight"} <= keys
    assert not any(key.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")) for key in keys)
    assert set(checkpoint.tensor_files(mistral_dir)) == set(checkpoint.tensor_files(hf_dir))
    assert (mistral_dir / "tekken.json").read_bytes() == tokenizer.TOKENIZER_FILE.read_bytes()


def test_sharded_mistral_checkpoint_has_an_index_of_its_shards(mistral_sharded_dir):
    index = json.loads((mistral_sharded_dir / mistral_layout.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"consolidated-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"]) == set(raw_tensors(mistral_sharded_dir))


def test_both_layouts_give_the_same_config(mistral_dir, hf_dir):
    ours, theirs = checkpoint.load_config(mistral_dir), checkpoint.load_config(hf_dir)
    text, hf_text = ours.text_config.to_dict(), theirs.text_config.to_dict()
    # The tiny HF config names a pad token; Mistral's params.json has no such field (nothing uses it).
    assert hf_text.pop("pad_token_id") == 11 and text.pop("pad_token_id") is None
    assert text == hf_text
    assert ours.vision_config.to_dict() == theirs.vision_config.to_dict()
    for field in ("image_token_index", "projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy",
                  "multimodal_projector_bias", "image_seq_length", "tie_word_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field


# -- tensors, outputs, fingerprints --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single file", "three shards"])
def test_both_layouts_load_the_same_tensors(hf_dir, mistral_dir, mistral_sharded_dir, layout):
    other = mistral_dir if layout == "single file" else mistral_sharded_dir
    expected, loaded = (load_decoder(d, torch.float32, CPU).state_dict() for d in (hf_dir, other))
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)
    expected, loaded = (load_vision_encoder(d, CPU, torch.float32).tower.state_dict() for d in (hf_dir, other))
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)
    # The q/k rows are stored in another order (the reorder is no identity), the other tensors as they are.
    raw, hf = raw_tensors(other), raw_tensors(hf_dir)
    for key in ("layers.0.attention.wq.weight", "vision_encoder.transformer.layers.1.attention.wk.weight"):
        name = mistral_layout.hf_name(key)
        assert not torch.equal(raw[key], hf[name])
        assert torch.equal(raw[key].sort(dim=0).values, hf[name].sort(dim=0).values)
    assert torch.equal(raw["layers.0.attention.wv.weight"], hf["language_model.model.layers.0.self_attn.v_proj.weight"])


def prompt_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 logits of one whole prompt through the decoder's own forward pass."""
    spec, length = model.spec, len(token_ids)
    cache = KVCache(spec.num_layers, 1, length, spec.num_kv_heads, spec.head_dim, torch.float32, CPU)
    slots = torch.arange(length)
    meta = AttentionMetadata(slot_mapping=slots, prefills=[PrefillSpan(0, length, length, slots)])
    hidden = model.embed(torch.tensor(token_ids), None, None)
    return model(hidden, slots, meta, AttentionBackend(cache, spec.head_dim ** -0.5), TorchOps())


TOKENS = [1, 3, 22177, 1044, 3074, 1584, 1636, 1063, 4, 1362, 7493, 2]
IMAGES = [np.random.default_rng(seed).standard_normal((3, 16 * h, 16 * w)).astype(np.float32)
          for seed, (h, w) in enumerate([(3, 5), (4, 2), (3, 5)])]


def test_both_layouts_compute_the_same_logits_and_features(hf_dir, mistral_dir):
    expected, got = (prompt_logits(load_decoder(d, torch.float32, CPU), TOKENS) for d in (hf_dir, mistral_dir))
    assert torch.equal(expected, got)
    expected, got = (load_vision_encoder(d, CPU, torch.float32).encode(IMAGES) for d in (hf_dir, mistral_dir))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_both_layouts_have_the_same_fingerprints(hf_dir, mistral_dir, mistral_sharded_dir, tmp_path):
    vision = vision_fingerprint(hf_dir)
    assert vision_fingerprint(mistral_dir) == vision_fingerprint(mistral_sharded_dir) == vision
    decoder = decoder_fingerprint(hf_dir)
    assert decoder_fingerprint(mistral_dir) == decoder_fingerprint(mistral_sharded_dir) == decoder

    def edited(prefix: str) -> Path:
        copy = tmp_path / prefix.strip(".")
        shutil.copytree(mistral_dir, copy)
        tensors = load_file(copy / mistral_layout.SINGLE_FILE)
        key = next(k for k in sorted(tensors) if k.startswith(prefix))
        tensors[key] = tensors[key] + 1.0
        save_file(tensors, copy / mistral_layout.SINGLE_FILE)
        return copy

    lm, vision_edit = edited("layers."), edited("vision_encoder.")
    assert vision_fingerprint(lm) == vision and decoder_fingerprint(lm) != decoder
    assert vision_fingerprint(vision_edit) != vision
    assert decoder_fingerprint(vision_edit) == decoder


def test_the_vision_fingerprint_follows_the_image_settings_of_the_checkpoint_s_tokenizer(mistral_dir, tmp_path):
    copy = tmp_path / "max512"
    shutil.copytree(mistral_dir, copy)
    data = json.loads((copy / "tekken.json").read_text())
    assert data["image"] == {"image_patch_size": 16, "max_image_size": 1024}
    data["image"]["max_image_size"] = 512   # other pixels for large images: other features
    (copy / "tekken.json").write_text(json.dumps(data))
    assert vision_fingerprint(copy) != vision_fingerprint(mistral_dir)
    assert decoder_fingerprint(copy) == decoder_fingerprint(mistral_dir)


# -- what Mistral's convention computes on the unconverted tensors ------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Mistral's RoPE: dimensions (2i, 2i + 1) of each head [T, H, d] are one complex number, turned by angle i."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def mistral_attention(x, w, prefix, num_heads, num_kv_heads, angles, is_causal):
    q, k, v = (F.linear(x, w[f"{prefix}attention.w{n}.weight"]).view(len(x), -1, w[f"{prefix}attention.wq.weight"]
               .shape[0] // num_heads) for n in "qkv")
    q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
    k, v = (t.repeat_interleave(num_heads // num_kv_heads, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=is_causal)
    return F.linear(out.transpose(0, 1).reshape(len(x), -1), w[f"{prefix}attention.wo.weight"])


def mistral_block(x, w, prefix, num_heads, num_kv_heads, angles, is_causal):
    x = x + mistral_attention(rms_norm(x, w[f"{prefix}attention_norm.weight"]), w, prefix, num_heads, num_kv_heads,
                              angles, is_causal)
    h = rms_norm(x, w[f"{prefix}ffn_norm.weight"])
    return x + F.linear(F.silu(F.linear(h, w[f"{prefix}feed_forward.w1.weight"]))
                        * F.linear(h, w[f"{prefix}feed_forward.w3.weight"]), w[f"{prefix}feed_forward.w2.weight"])


def mistral_logits(params: dict, w: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """The text model as Mistral's reference runs it, on consolidated.safetensors' tensors as stored."""
    head_dim = params["head_dim"]
    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(len(token_ids)).float()[:, None] * freqs[None]
    x = w["tok_embeddings.weight"][token_ids]
    for i in range(params["n_layers"]):
        x = mistral_block(x, w, f"layers.{i}.", params["n_heads"], params["n_kv_heads"], angles, is_causal=True)
    return F.linear(rms_norm(x, w["norm.weight"]), w["output.weight"])


def mistral_features(vision: dict, w: dict[str, torch.Tensor], pixels: np.ndarray) -> torch.Tensor:
    """One image through Mistral's vision encoder: 2-D RoPE, the even frequencies turning with the patch row and the
    odd ones with the patch column, on interleaved pairs of dimensions."""
    patches = F.conv2d(torch.from_numpy(pixels)[None], w["vision_encoder.patch_conv.weight"], stride=16)[0]
    rows, cols = patches.shape[1:]
    x = rms_norm(patches.flatten(1).T, w["vision_encoder.ln_pre.weight"])
    head_dim = vision["hidden_size"] // vision["num_attention_heads"]
    freqs = 1.0 / vision["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    row, col = torch.meshgrid(torch.arange(rows).float(), torch.arange(cols).float(), indexing="ij")
    angles = torch.cat([row.reshape(-1, 1) * freqs[0::2], col.reshape(-1, 1) * freqs[1::2]], dim=-1)
    heads = vision["num_attention_heads"]
    for i in range(vision["num_hidden_layers"]):
        x = mistral_block(x, w, f"vision_encoder.transformer.layers.{i}.", heads, heads, angles, is_causal=False)
    return x


def test_loaded_models_compute_what_mistral_s_rope_computes_on_the_stored_tensors(mistral_dir, tmp_path,
                                                                                 monkeypatch):
    # The tiny model's random attention is nearly uniform, so positions hardly matter to it: q and k ten times
    # larger make it sharp enough that a wrong rotation shows.
    model_dir = tmp_path / "sharp"
    shutil.copytree(mistral_dir, model_dir)
    stored = {key: tensor * 10 if ".attention.wq." in key or ".attention.wk." in key else tensor
              for key, tensor in raw_tensors(mistral_dir).items()}
    save_file(stored, model_dir / mistral_layout.SINGLE_FILE)
    params = json.loads((model_dir / "params.json").read_text())
    expected_logits = mistral_logits(params, stored, TOKENS)
    expected_features = mistral_features(params["vision_encoder"], stored, IMAGES[0])

    def differences() -> tuple[float, float]:
        logits = prompt_logits(load_decoder(model_dir, torch.float32, CPU), TOKENS)
        (features,) = load_vision_encoder(model_dir, CPU, torch.float32).encode(IMAGES[:1])
        return float((logits - expected_logits).abs().max()), float((features - expected_features).abs().max())

    text_error, vision_error = differences()
    assert text_error < 1e-4 and vision_error < 1e-4, (text_error, vision_error)
    # Without the q/k reorder the same tensors compute something else: the test sees the reorder.
    monkeypatch.setattr(mistral_layout, "to_rotate_half", lambda weight, num_heads: weight)
    text_error, vision_error = differences()
    assert text_error > 1e-2 and vision_error > 1e-2, (text_error, vision_error)


# -- refusals ----------------------------------------------------------------------------------------------------

def vision_params(**fields):
    return {**PIXTRAL_12B_PARAMS, "vision_encoder": {**PIXTRAL_12B_PARAMS["vision_encoder"], **fields}}


@pytest.mark.parametrize("params, fragment", [
    ({**PIXTRAL_12B_PARAMS, "moe": {"num_experts": 8}}, "params.json: moe"),
    ({**PIXTRAL_12B_PARAMS, "quantization": {"qformat_weight": "fp8_e4m3"}}, "params.json: quantization"),
    ({**PIXTRAL_12B_PARAMS, "sliding_window": 4096}, "params.json: sliding_window"),
    ({**PIXTRAL_12B_PARAMS, "tied_embeddings": True}, "params.json: tied_embeddings"),
    (vision_params(spatial_merge_size=2), "vision_encoder.spatial_merge_size"),
    (vision_params(mm_projector_id="patch_merge"), "vision_encoder.mm_projector_id"),
    (vision_params(adapter_bias=False), "vision_encoder.adapter_bias"),
    ({k: v for k, v in PIXTRAL_12B_PARAMS.items() if k != "vision_encoder"}, "no vision_encoder"),
    ({k: v for k, v in PIXTRAL_12B_PARAMS.items() if k != "n_kv_heads"}, "params.json: no n_kv_heads"),
    ({**PIXTRAL_12B_PARAMS, "vision_encoder": {k: v for k, v in PIXTRAL_12B_PARAMS["vision_encoder"].items()
                                               if k != "rope_theta"}}, "no vision_encoder.rope_theta"),
], ids=["moe", "quantization", "sliding window", "tied", "spatial merge", "patch merger", "no adapter bias",
        "text only", "missing text field", "missing vision field"])
def test_unsupported_mistral_params_are_refused_by_name(tmp_path, params, fragment):
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(checkpoint.CheckpointError, match=fragment):
        checkpoint.load_config(tmp_path)


def test_a_tensor_pixtral_has_not_is_refused_by_name(mistral_dir, tmp_path):
    copy = tmp_path / "extra"
    shutil.copytree(mistral_dir, copy)
    tensors = load_file(copy / mistral_layout.SINGLE_FILE)
    tensors["patch_merger.merging_layer.weight"] = torch.zeros(4, 4)
    save_file(tensors, copy / mistral_layout.SINGLE_FILE)
    with pytest.raises(checkpoint.CheckpointError, match="patch_merger.merging_layer.weight"):
        checkpoint.read_tensors(copy, checkpoint.part_renamer("vision_tower"), torch.float32)


def test_a_directory_of_neither_layout_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no config.json .*params.json"):
        checkpoint.load_config(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(PIXTRAL_12B_PARAMS))
    with pytest.raises(checkpoint.CheckpointError, match="consolidated.safetensors"):
        checkpoint.tensor_files(tmp_path)


# -- the tokenizer -----------------------------------------------------------------------------------------------

def test_a_checkpoint_s_tekken_json_is_its_tokenizer(mistral_dir, hf_dir):
    assert tokenizer.tokenizer_file(mistral_dir) == mistral_dir / "tekken.json"
    assert tokenizer.tokenizer_file(hf_dir) == tokenizer.TOKENIZER_FILE


def test_each_tokenizer_file_is_loaded_once_when_threads_ask_at_once(monkeypatch, tmp_path):
    other = tmp_path / "tekken.json"
    shutil.copyfile(tokenizer.TOKENIZER_FILE, other)
    calls: list[str] = []
    loaded_both = threading.Barrier(16, timeout=30)

    def counting_load(path):
        calls.append(path)
        return object()
    monkeypatch.setattr(tokenizer.MistralTokenizer, "from_file", staticmethod(counting_load))
    tokenizer._load.cache_clear()

    def ask(index: int):
        loaded_both.wait()   # all sixteen threads ask at the same moment
        return tokenizer.load_tokenizer(other if index % 2 else None)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            loaded = list(pool.map(ask, range(16)))
        assert sorted(calls) == sorted([str(tokenizer.TOKENIZER_FILE.resolve()), str(other.resolve())])
        assert all(each is loaded[0] for each in loaded[0::2]) and all(each is loaded[1] for each in loaded[1::2])
        assert loaded[0] is not loaded[1]
        assert tokenizer.load_tokenizer(tmp_path / "." / "tekken.json") is loaded[1]   # one per file, however named
    finally:
        tokenizer._load.cache_clear()   # the real ones again for whoever asks next


# -- through the running stack -------------------------------------------------------------------------------------

def encode(tokenizer_path: Path, text: str) -> list[int]:
    request = ChatCompletionRequest(messages=[UserMessage(content=text)])
    return MistralTokenizer.from_file(str(tokenizer_path)).encode_chat_completion(request).tokens


PROBE = "Hello"   # a text whose token the stack's tekken.json gives another id


def swap_vocabulary_entries(path: Path, token: bytes, other_rank: int) -> None:
    """Rewrites a tekken.json so that `token` and the token of rank `other_rank` trade ids."""
    data = json.loads(path.read_text())
    vocab = data["vocab"]
    rank = next(entry["rank"] for entry in vocab if base64.b64decode(entry["token_bytes"]) == token)
    for field in ("token_bytes", "token_str"):
        vocab[rank][field], vocab[other_rank][field] = vocab[other_rank][field], vocab[rank][field]
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def mistral_stack(module_redis, tmp_path_factory):
    """The stack on the tiny model of the shared stack (seed 0) in Mistral's layout, whose tekken.json differs from
    mistral-common's in the ids of two tokens."""
    model_dir = make_checkpoint(tmp_path_factory.mktemp("mistral-stack") / "model", "--seed", "0", "--format",
                                "mistral")
    swap_vocabulary_entries(model_dir / "tekken.json", PROBE.encode(), 129000)
    running = Stack(model_dir, module_redis.url, tmp_path_factory.mktemp("mistral-stack-run")).start()
    yield running
    running.stop()


def tokenize(gateway: str, chat) -> list[int]:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Tokenize(chat_request(chat), timeout=60).token_ids)


def chat_token_ids(gateway: str, chat, max_tokens: int) -> list[int]:
    request = chat_request(chat, max_tokens=max_tokens, temperature=0.0)
    with grpc.insecure_channel(gateway) as channel:
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))
    return [token for response in responses for token in response.token_ids]


CHATS = {
    "text": [("user", ["Describe a picture of the sea."])],
    "image": [("user", ["Describe this picture.", image_bytes(noise_image(64, 48, seed=21))])],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_a_chat_on_mistral_s_layout_gives_the_tokens_of_the_hf_layout(stack, mistral_stack, name):
    chat = CHATS[name]
    own = mistral_stack.model_dir / "tekken.json"
    # The two tokenizers agree on this chat's text: the prompts are the same ids.
    assert encode(own, chat[0][1][0]) == encode(tokenizer.TOKENIZER_FILE, chat[0][1][0])
    assert tokenize(mistral_stack.gateway, chat) == tokenize(stack.gateway, chat)
    expected = chat_token_ids(stack.gateway, chat, max_tokens=10)
    assert len(expected) == 10
    assert chat_token_ids(mistral_stack.gateway, chat, max_tokens=10) == expected


def test_the_checkpoint_s_own_tekken_json_is_the_tokenizer_used(stack, mistral_stack):
    own, default = encode(mistral_stack.model_dir / "tekken.json", PROBE), encode(tokenizer.TOKENIZER_FILE, PROBE)
    assert own != default   # the file differs detectably
    assert tokenize(mistral_stack.gateway, [("user", [PROBE])]) == own
    assert tokenize(stack.gateway, [("user", [PROBE])]) == default
