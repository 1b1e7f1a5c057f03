"""GPT-2 checkpoints in both layouts load into the zoo's GPT: minGPT-style (ours) and Hugging Face's.

Hugging Face GPT-2 stores ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` as Conv1D
``[in, out]``, with a ``transformer.`` prefix (``GPT2LMHeadModel``) or without (``GPT2Model``), and older
checkpoints carry ``attn.bias``/``attn.masked_bias`` mask buffers. Every test here writes real files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose_config, run_in_process, write_byte_tokenizer
from runner.load.checkpoint.files import SafetensorsCheckpoint, TensorEntry
from runner.errors import CheckpointError
from runner.infer.generate import Request, generate
from runner.infer.sampling import SamplingParams
from runner.infer.engine import Engine
from runner.zoo.gpt import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_WHY = "legacy attention mask buffer, rebuilt by the model"
TOKENS = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 257, 299, 3]])
# The shape transformers' test model has below, as runner overrides.
SMALL = dict(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32)


def arch_overrides(**arch: int) -> list[str]:
    return ["model=gpt2tiny", *(f"model.arch.{k}={v}" for k, v in arch.items())]


def load(path: Path, run_dir: Path, **arch: int):
    """A local checkpoint as the Engine loads it, all on the CPU."""
    cfg = compose_config(*arch_overrides(**arch), "checkpoint=local", f"checkpoint.path={path}", "hardware=cpu")
    return Engine(cfg, run_dir).loaded


def zoo_model(seed: int = 0, **arch: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(**arch).eval()
    randomize_norms_and_biases(model)
    return model


def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():  # both sides start them at 1 and 0: make a mix-up of any two tensors visible
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)


def hf_layout(model: GPT, prefix: bool, legacy_buffers: bool, tied_copy: bool) -> dict[str, torch.Tensor]:
    """What Hugging Face's GPT-2 would store for ``model``: Conv1D weights transposed, names as HF spells them."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if tied_copy:
                out[name] = t.clone()
            continue
        key = name if prefix else name.removeprefix("transformer.")
        out[key] = t.t().contiguous() if name.endswith(CONV1D) else t.clone()
    if legacy_buffers:
        T = model.block_size
        for i in range(len(model.transformer.h)):
            head = f"{'transformer.' if prefix else ''}h.{i}.attn"
            out[f"{head}.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            out[f"{head}.masked_bias"] = torch.tensor(-1e4)
    return out


def logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.inference_mode():
        out = model(tokens)
    return getattr(out, "logits", out)


class Ids:
    """A tokenizer that is its own ids, so generation compares token ids and nothing else."""

    eos_ids: frozenset[int] = frozenset()
    pad_id = 0

    def encode(self, ids):
        return list(ids)

    def decode(self, ids):
        return " ".join(map(str, ids))


# --- the name map itself -----------------------------------------------------------------------------------------

def entries(tensors: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
    return {k: TensorEntry(Path("m.safetensors"), v.dtype, tuple(v.shape)) for k, v in tensors.items()}


@pytest.mark.parametrize("prefix", [True, False])
def test_hf_layout_maps_every_model_name_and_transposes_the_four_conv1d_weights(prefix):
    model = zoo_model(**SMALL)
    stored = hf_layout(model, prefix=prefix, legacy_buffers=True, tied_copy=False)
    names = GPT.checkpoint_names(entries(stored))
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    assert set(names.sources) == expected
    for name, src in names.sources.items():
        assert src.key == (name if prefix else name.removeprefix("transformer."))
        transposed = name.endswith(CONV1D)
        assert src.transposed == transposed, name
    assert names.ignored == {k: IGNORED_WHY for k in stored if k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert len(names.ignored) == 4


def test_own_layout_is_the_identity():
    model = zoo_model(**SMALL)
    stored = {k: v for k, v in model.state_dict().items()}  # the tied head's copy too: the key check ignores it
    names = GPT.checkpoint_names(entries(stored))
    assert {n: (s.key, s.transposed) for n, s in names.sources.items()} == {k: (k, False) for k in stored}
    assert names.ignored == {}


def test_square_c_proj_follows_the_checkpoint_layout_not_its_own_shape():
    """attn.c_proj is [n_embd, n_embd] either way: it is transposed exactly when the rest is."""
    model = zoo_model(**SMALL)
    hf = GPT.checkpoint_names(entries(hf_layout(model, True, False, False))).sources
    ours = GPT.checkpoint_names(entries(model.state_dict())).sources
    assert hf["transformer.h.1.attn.c_proj.weight"].transposed
    assert not ours["transformer.h.1.attn.c_proj.weight"].transposed


def test_mixed_layouts_are_refused():
    stored = hf_layout(zoo_model(**SMALL), True, False, False)
    stored["transformer.h.1.mlp.c_fc.weight"] = stored["transformer.h.1.mlp.c_fc.weight"].t()
    with pytest.raises(CheckpointError, match=r"\[in, out\].*\[out, in\].*one layout") as info:
        GPT.checkpoint_names(entries(stored))
    assert len(info.value.lines) == 1


def test_unknown_and_doubly_stored_keys_keep_their_own_name_so_they_are_reported():
    stored = hf_layout(zoo_model(**SMALL), True, False, False)
    stored["h.0.ln_1.weight"] = stored["transformer.h.0.ln_1.weight"]  # under both spellings
    stored["transformer.h.0.attn.rotary"] = torch.zeros(4)
    sources = GPT.checkpoint_names(entries(stored)).sources
    assert sources["transformer.h.0.ln_1.weight"].key == "transformer.h.0.ln_1.weight"
    assert sources["h.0.ln_1.weight"].key == "h.0.ln_1.weight"
    assert sources["transformer.h.0.attn.rotary"].key == "transformer.h.0.attn.rotary"


# --- hand-written Hugging Face layout: no transformers needed --------------------------------------------------------

@pytest.mark.parametrize("prefix,tied_copy", [(False, False), (True, True)], ids=["GPT2Model", "GPT2LMHeadModel"])
def test_hand_written_hf_checkpoint_loads_reports_ignored_buffers_and_matches_the_zoo_model(tmp_path, prefix,
                                                                                          tied_copy):
    model = zoo_model(seed=1, **SMALL)
    file = tmp_path / "ckpt" / "model.safetensors"
    file.parent.mkdir()
    save_file(hf_layout(model, prefix, legacy_buffers=True, tied_copy=tied_copy), str(file))

    result = load(file, tmp_path / "run", **SMALL)

    masks = [f"{'transformer.' if prefix else ''}h.{i}.attn.{b}" for i in (0, 1) for b in ("bias", "masked_bias")]
    assert set(result.keys.ignored) == ({"lm_head.weight"} if tied_copy else set()) | {
        f"{key} ({IGNORED_WHY})" for key in masks}
    assert result.model.lm_head.weight is result.model.transformer.wte.weight
    assert all(not p.is_meta for p in result.model.parameters())
    for name, p in result.model.state_dict().items():
        torch.testing.assert_close(p, model.state_dict()[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(logits(result.model), logits(model), rtol=0, atol=0)


def test_own_layout_still_loads_as_stored(tmp_path):
    model = zoo_model(seed=2, **SMALL)
    file = tmp_path / "model.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(file))
    result = load(file, tmp_path / "run", **SMALL)
    assert result.keys.ignored == ()
    torch.testing.assert_close(logits(result.model), logits(model), rtol=0, atol=0)


def test_mis_shaped_hf_checkpoint_is_one_line_per_tensor(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file(hf_layout(zoo_model(**{**SMALL, "n_embd": 48}), True, True, False), str(file))
    with pytest.raises(CheckpointError) as info:
        load(file, tmp_path / "run", **SMALL)
    lines = info.value.lines
    assert all("\n" not in line for line in lines)
    assert ("shape mismatch for transformer.h.0.attn.c_attn.weight: the checkpoint has [144, 48], "
            "the model expects [96, 32]; check the model config against the checkpoint") in lines
    assert "shape mismatch for transformer.wte.weight: the checkpoint has [300, 48], the model expects [300, 32]; " \
           "check the model config against the checkpoint" in lines
    shape_lines = [line for line in lines if line.startswith("shape mismatch for ")]
    named = [line.split()[3].rstrip(":") for line in shape_lines]
    assert len(named) == len(set(named))  # one line per tensor
    assert len(lines) == 21 and lines[-1].startswith("... and ")  # 4 + 2 x 12 mis-shaped tensors, 20 shown


def test_missing_tensor_of_an_hf_checkpoint_is_named_by_module(tmp_path):
    stored = hf_layout(zoo_model(**SMALL), False, True, False)
    del stored["h.1.mlp.c_fc.weight"]
    file = tmp_path / "model.safetensors"
    save_file(stored, str(file))
    with pytest.raises(CheckpointError) as info:
        load(file, tmp_path / "run", **SMALL)
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(
        "missing tensor transformer.h.1.mlp.c_fc.weight (module transformer.h.1.mlp.c_fc); the closest stored name is ")


def test_unexpected_tensor_of_an_hf_checkpoint_is_an_error(tmp_path):
    stored = hf_layout(zoo_model(**SMALL), False, True, False)
    stored["h.0.attn.rotary_inv_freq"] = torch.ones(8)
    file = tmp_path / "model.safetensors"
    save_file(stored, str(file))
    with pytest.raises(CheckpointError) as info:
        load(file, tmp_path / "run", **SMALL)
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith("unexpected tensor h.0.attn.rotary_inv_freq in model.safetensors")


def test_mis_shaped_hf_checkpoint_from_the_command_line_is_errors_not_a_traceback(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file(hf_layout(zoo_model(**{**SMALL, "n_embd": 48}), False, True, False), str(file))
    write_byte_tokenizer(tmp_path)
    overrides = [*arch_overrides(**SMALL), "checkpoint=local", f"checkpoint.path={file}", "hardware=cpu"]
    # what python -m runner does, in-process: a bug would raise here; a failed outcome is what exits 2
    outcome, lines = run_in_process(tmp_path / "run", *overrides)
    assert outcome is not None and outcome.error, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and all(line.startswith("error: checkpoint: ") for line in errors)
    assert ("error: checkpoint: shape mismatch for transformer.h.0.mlp.c_proj.weight: the checkpoint has [48, 192], "
            "the model expects [32, 128]; check the model config against the checkpoint") in errors


# --- transformers' own save_pretrained ----------------------------------------------------------------------------

def hf_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.GPT2Config(
        n_layer=SMALL["n_layer"], n_head=SMALL["n_head"], n_embd=SMALL["n_embd"], vocab_size=SMALL["vocab_size"],
        n_positions=SMALL["block_size"], bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5,
        activation_function="gelu_new", initializer_range=0.3)  # wide enough that greedy tokens vary


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    """transformers' GPT2LMHeadModel, saved by its own save_pretrained as sharded safetensors."""
    transformers, config = hf_config()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize_norms_and_biases(model)
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(folder, max_shard_size="20KB", safe_serialization=True)
    return model, folder


def test_save_pretrained_writes_what_this_suite_expects(hf_lm):
    _, folder = hf_lm
    checkpoint = SafetensorsCheckpoint(sorted(folder.glob("*.safetensors")), "local")
    assert len(checkpoint.files) > 2 and (folder / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in checkpoint.entries  # tied: not saved
    assert checkpoint.entries["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D [in, out]


def test_transformers_gpt2_lm_head_model_loads_and_its_logits_match(hf_lm, tmp_path):
    hf, folder = hf_lm
    result = load(folder, tmp_path, **SMALL)
    assert len(result.checkpoint.files) > 2
    assert result.keys.ignored == ()
    assert result.model.lm_head.weight is result.model.transformer.wte.weight
    torch.testing.assert_close(logits(result.model), logits(hf), rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_transformers_own(hf_lm, tmp_path):
    hf, folder = hf_lm
    result = load(folder, tmp_path, **SMALL)
    prompt = TOKENS[0].tolist()
    (done,) = generate(result.model, Ids(), [Request(0, "", tuple(prompt))], SamplingParams(max_new_tokens=8),
                       batch_size=1, seed=0)
    ours = done.output_tokens
    ids = TOKENS
    theirs = []
    for _ in range(8):
        token = int(logits(hf, ids)[0, -1].argmax())
        theirs.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert ours == theirs
    assert len(set(theirs)) > 1  # not a degenerate model that repeats one token


def test_transformers_gpt2_model_without_prefix_loads_with_the_head_tied_to_wte(hf_lm, tmp_path):
    transformers, config = hf_config()
    hf, _ = hf_lm
    base = transformers.GPT2Model(config).eval()
    base.load_state_dict(hf.transformer.state_dict())
    folder = tmp_path / "base"
    base.save_pretrained(folder, max_shard_size="20KB", safe_serialization=True)
    keys = SafetensorsCheckpoint(sorted(folder.glob("*.safetensors")), "local").entries
    assert "h.0.attn.c_attn.weight" in keys and not any(k.startswith("transformer.") for k in keys)

    result = load(folder, tmp_path / "run", **SMALL)
    assert result.model.lm_head.weight is result.model.transformer.wte.weight
    with torch.no_grad():
        expected = base(TOKENS).last_hidden_state @ base.wte.weight.t()  # GPT-2's head is wte, transposed
    torch.testing.assert_close(logits(result.model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(result.model), logits(hf), rtol=1e-5, atol=1e-5)


def test_conv1d_weights_are_views_of_the_file_in_fp32_and_plain_weights_once_cast(hf_lm, tmp_path):
    """fp32 from an fp32 checkpoint: the transposed layout is used as it is, no copy. Cast to bfloat16 (a copy
    anyway): a plain contiguous [out, in] weight, which half-precision CPU kernels run far faster."""
    hf, folder = hf_lm
    same = load(folder, tmp_path / "fp32", **SMALL)
    weight = same.model.transformer.h[0].mlp.c_fc.weight
    assert weight.shape == (4 * SMALL["n_embd"], SMALL["n_embd"]) and not weight.is_contiguous()
    assert torch.equal(weight, hf.transformer.h[0].mlp.c_fc.weight.t())
    cfg = compose_config(*arch_overrides(**SMALL), "checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu",
                         "dtype=bfloat16")
    cast = Engine(cfg, tmp_path / "bf16").loaded.model.transformer.h[0].mlp.c_fc.weight
    assert cast.dtype == torch.bfloat16 and cast.is_contiguous()
    assert torch.equal(cast, hf.transformer.h[0].mlp.c_fc.weight.t().to(torch.bfloat16))
