"""The architecture table (apt_salience/architectures.py): site finding on every preset, GQA, gating, lookups, errors.

Oracles: the test's own site regexes (tests/_reference.SITE_PATTERNS, written independently of the
table), the modules' own weight shapes, and parameter counts computed by hand from the tiny configs.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import pytest
import torch
import transformers as tf
from torch import nn

from apt_salience.architectures import (
    ARCHITECTURES,
    attention_projections,
    detect_architecture,
    ffn_input_projections,
    find_sites,
    linear_dims,
    linear_weight,
    relative_name,
    resolve_module,
)
from apt_salience.config import ConfigError, load_config
from tests._models import ARCHS, FFN, HEADS, HIDDEN, head_dim_of, make_model
from tests._reference import discover_sites

GATED = {"llama", "mistral", "qwen2", "t5-gated"}
N_KV = {"llama": 2, "mistral": 2, "qwen2": 2}  # tests/_models.py builds the LLaMA family with 2 KV heads


def _weight_shape(module: nn.Module) -> Tuple[int, int]:
    """(in, out) read from the weight itself: nn.Linear is [out, in], transformers' Conv1D [in, out]."""
    w = module.weight
    return (int(w.shape[0]), int(w.shape[1])) if type(module).__name__ == "Conv1D" else (int(w.shape[1]), int(w.shape[0]))


def _layer(name: str) -> str:
    m = re.match(r"(.*?\.\d+)(\.|$)", name)
    assert m, name
    return m.group(1)


@pytest.mark.parametrize("arch", ARCHS)
def test_find_sites_on_every_preset(arch: str) -> None:
    model = make_model(arch)
    sites, name = find_sites(model, load_config(None))
    assert name == arch.replace("-gated", "") and detect_architecture(model) == name
    expected = discover_sites(model, arch)  # the test's own regexes
    assert [(s.name, s.kind) for s in sites] == list(expected.items())
    modules = dict(model.named_modules())
    d_head, n_kv = head_dim_of(arch), N_KV.get(arch, HEADS)
    for s in sites:
        assert s.module is modules[s.name]
        assert (s.in_features, s.out_features) == _weight_shape(modules[s.name])
        assert s.layer == _layer(s.name) and s.device == torch.device("cpu")
        if s.kind == "head":
            assert (s.block_size, s.num_blocks) == (d_head, HEADS)
            assert s.block_param_count == (2 + 2 * n_kv / HEADS) * d_head * HIDDEN
        else:
            assert (s.block_size, s.num_blocks) == (1, FFN)
            assert s.block_param_count == (3 if arch in GATED else 2) * HIDDEN
        assert s.writes_hidden and s.out_features == HIDDEN


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_grouped_query_heads_cost_their_share_of_the_kv_projections(n_kv: int) -> None:
    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                         num_key_value_heads=n_kv, intermediate_size=FFN, max_position_embeddings=16)
    model = tf.LlamaForCausalLM(cfg)
    (head,) = [s for s in find_sites(model, load_config(None))[0] if s.kind == "head"]
    attn = model.model.layers[0].self_attn
    # the head's weights by hand: its q rows and o columns, plus 1/group of one KV head's k and v rows
    per_head = d = HIDDEN // HEADS
    own = attn.q_proj.weight[:per_head].numel() + attn.o_proj.weight[:, :per_head].numel()
    shared = (attn.k_proj.weight.numel() + attn.v_proj.weight.numel()) / HEADS
    assert head.block_param_count == own + shared == (2 + 2 * n_kv / HEADS) * d * HIDDEN


class _FFN(nn.Module):
    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        if gated:
            self.gate = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(h * torch.sigmoid(self.gate(x)) if hasattr(self, "gate") else torch.relu(h))


@pytest.mark.parametrize("case, gated", [
    ("llama", True), ("t5-gated", True), ("t5", False), ("bert", False), ("gpt2", False), ("opt", False),
    ("custom-gated", True), ("custom-plain", False),
])
def test_gating_is_detected_from_the_ffn_inputs(case: str, gated: bool) -> None:
    if case.startswith("custom"):
        model: nn.Module = nn.Sequential(_FFN(case == "custom-gated"))
        cfg = load_config({"architecture": "custom", "sites": {"neurons": r"0\.down"}})
        d_model = 8
    else:
        model, cfg, d_model = make_model(case), load_config(None), HIDDEN
    neurons = [s for s in find_sites(model, cfg)[0] if s.kind == "neuron"]
    assert neurons and all(s.block_param_count == (3 if gated else 2) * d_model for s in neurons)


def test_peft_wrappers_are_sites_with_their_base_shapes_and_lora_b_is_an_adapter_site() -> None:
    peft = pytest.importorskip("peft")
    base = make_model("bert")
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, target_modules=["query", "value", "dense"]))
    sites, _ = find_sites(model, load_config(None))
    kinds = {s.name: s.kind for s in sites}
    head = next(s for s in sites if s.kind == "head")
    assert type(head.module).__name__ == "Linear" and hasattr(head.module, "base_layer")
    assert (head.in_features, head.out_features) == (HIDDEN, HIDDEN)
    adapters = [s for s in sites if s.kind == "adapter"]
    assert adapters and all(s.name.endswith(".lora_B.default") and s.num_blocks == 3 for s in adapters)
    # rank r costs its lora_A row and lora_B column: in + out of the wrapped layer
    q = next(s for s in adapters if ".query." in s.name)
    assert q.block_param_count == HIDDEN + HIDDEN
    assert not any(".lora_" in n and k != "adapter" for n, k in kinds.items())


def test_linear_dims_and_weight_read_conv1d_transposed() -> None:
    gpt = make_model("gpt2")
    conv = gpt.transformer.h[0].attn.c_attn
    assert linear_dims(conv) == (HIDDEN, 3 * HIDDEN)
    assert torch.equal(linear_weight(conv), conv.weight.t())
    lin = nn.Linear(3, 5)
    assert linear_dims(lin) == (3, 5) and linear_weight(lin) is lin.weight
    assert linear_dims(nn.ReLU()) is None
    with pytest.raises(TypeError, match="no weight tensor"):
        linear_weight(nn.ReLU())


def test_module_lookup_relative_names_and_wrapper_prefixes() -> None:
    assert relative_name("encoder.layer.0.attention.output.dense", 2, "self.query") == "encoder.layer.0.attention.self.query"
    assert relative_name("h.1.mlp.c_proj", 1) == "h.1.mlp"
    model = make_model("bert")
    modules = dict(model.named_modules())
    name = "bert.encoder.layer.0.output.dense"
    assert resolve_module(modules, name) == (name, modules[name])
    assert resolve_module(modules, "base_model.model." + name)[0] == name  # a PEFT prefix added
    assert resolve_module(modules, "encoder.layer.0.output.dense")[0] == name  # ... or removed
    with pytest.raises(ValueError, match="'nowhere.dense' named by the masks / selection is not in this model"):
        resolve_module(modules, "nowhere.dense")
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_module(modules, "dense")


def test_projection_lookups_name_what_is_missing() -> None:
    model = make_model("llama")
    modules = dict(model.named_modules())
    site = "model.layers.0.self_attn.o_proj"
    proj = attention_projections(ARCHITECTURES["llama"], modules, site)
    assert {k: n for k, (n, _) in proj.items()} == {r: f"model.layers.0.self_attn.{r}_proj" for r in "qkv"}
    ffn = ffn_input_projections(ARCHITECTURES["llama"], modules, "model.layers.0.mlp.down_proj")
    assert [n for n, _ in ffn] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    del modules["model.layers.0.self_attn.k_proj"], modules["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"cannot find the k projection 'model\.layers\.0\.self_attn\.k_proj' of head "
                                         r"site 'model\.layers\.0\.self_attn\.o_proj' \(llama layout\)"):
        attention_projections(ARCHITECTURES["llama"], modules, site)
    with pytest.raises(ValueError, match=r"cannot find the FFN input projection\(s\) model\.layers\.0\.mlp\.gate_proj"
                                         r"\+model\.layers\.0\.mlp\.up_proj of neuron site"):
        ffn_input_projections(ARCHITECTURES["llama"], modules, "model.layers.0.mlp.down_proj")


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.o = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x)


@pytest.mark.parametrize("model, raw, pattern", [
    # sites given without head_dim and a model config that cannot tell it
    (_Attn(), {"sites": {"heads": "o"}}, r"cannot tell the head size for head site 'o': set 'sites.head_dim'"),
    # the table's layout does not fit a model of another family
    (_Attn(), {"architecture": "bert"}, r"no sites matched \(architecture 'bert'"),
    (_Attn(), None, r"architecture 'auto' could not recognise this model \(model_type=None, class _Attn\).*"
                    r"Linear-like modules found:\n  o  \(x1\).*architecture: custom"),
], ids=["no-head-dim", "wrong-family", "unknown"])
def test_find_sites_errors_name_the_problem_and_the_fix(model: nn.Module, raw: Optional[Dict[str, object]],
                                                        pattern: str) -> None:
    with pytest.raises(ConfigError, match=re.compile(pattern, re.S)):
        find_sites(model, load_config(raw))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        find_sites("model", load_config(None))  # type: ignore[arg-type]
