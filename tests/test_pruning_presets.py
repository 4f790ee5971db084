"""prune_model on every preset: pruned == the dense model masked by this file's own hooks, parameter drops
counted by hand from the shapes, save_pruned / load_pruned round trips, hidden dims against a kept-stats
reference, and the error paths (the model unchanged on every error)."""

from __future__ import annotations

import json
import re
import zlib
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from _models import ARCHS, FFN, HEADS, HIDDEN, VOCAB, head_dim_of, make_batch, make_model
from apt_salience.masks import apply_masks
from apt_salience.pruning import PRUNING_FILE, count_parameters, load_pruned, prune_model, save_pruned
from apt_salience.selection import BlockLayout, Selection

D = HIDDEN
LLAMAS = ("llama", "mistral", "qwen2")
N_KV = 2  # tests/_models.py builds the LLaMA family with 2 KV heads for 4 query heads

# This file's own knowledge of where the head sites (attention output projections) and neuron sites
# (FFN down projections) are: regexes searched at the end of the module names.
HEAD_SITE = {"bert": r"attention\.output\.dense", "roberta": r"attention\.output\.dense", "llama": r"self_attn\.o_proj",
             "mistral": r"self_attn\.o_proj", "qwen2": r"self_attn\.o_proj", "t5": r"(SelfAttention|EncDecAttention)\.o",
             "t5-gated": r"(SelfAttention|EncDecAttention)\.o", "gpt2": r"attn\.c_proj", "opt": r"self_attn\.out_proj",
             "vit": r"attention\.o_proj"}
NEURON_SITE = {"bert": r"layer\.\d+\.output\.dense", "roberta": r"layer\.\d+\.output\.dense", "llama": r"mlp\.down_proj",
               "mistral": r"mlp\.down_proj", "qwen2": r"mlp\.down_proj", "t5": r"DenseReluDense\.wo",
               "t5-gated": r"DenseReluDense\.wo", "gpt2": r"mlp\.c_proj", "opt": r"layers\.\d+\.fc2", "vit": r"mlp\.fc2"}


def sites_of(model: nn.Module, pattern: str) -> List[str]:
    return [n for n, _ in model.named_modules() if re.search(r"(^|\.)" + pattern + "$", n)]


def logits(model: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**batch).logits


def with_hooks(model: nn.Module, hooks: List[Tuple[str, str, Callable[..., Any]]], fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` with forward (pre-)hooks ``(module name, 'pre' | 'post', hook)`` attached, then remove them."""
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(h) if kind == "pre" else mods[n].register_forward_hook(h)
               for n, kind, h in hooks]
    try:
        return fn()
    finally:
        for h in handles:
            h.remove()


def input_mask_hooks(channel_masks: Dict[str, Tensor]) -> List[Tuple[str, str, Callable[..., Any]]]:
    """Pre-hooks multiplying each site's input by a 0/1 channel mask (the blocks the selection drops)."""
    def make(m: Tensor) -> Callable[..., Any]:
        return lambda mod, args: (args[0] * m.to(args[0].dtype),) + tuple(args[1:])
    return [(n, "pre", make(m)) for n, m in channel_masks.items()]


def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snap: Dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(snap)
    assert all(now[k].shape == snap[k].shape and torch.equal(now[k], snap[k]) for k in snap)


# ---------------------------------------------------------------------------------------------
# hand counts


def kept_query_and_kv(keep: Tensor, n_kv: int) -> Tuple[int, int]:
    """Query heads and KV heads that physically stay under grouped-query attention (docs/pruning.md's rule):
    a group goes when all its heads go, the others keep as many heads as the fullest one; an empty attention
    keeps one head of one group."""
    g = keep.numel() // n_kv
    counts = [int(keep[j * g:(j + 1) * g].sum()) for j in range(n_kv)]
    if sum(counts) == 0:
        return 1, 1
    groups = sum(c > 0 for c in counts)
    return max(counts) * groups, groups


def hand_count_removed(arch: str, model: nn.Module, head_keep: Dict[str, Tensor], neuron_keep: Dict[str, Tensor]) -> int:
    hd = head_dim_of(arch)
    removed = 0
    for site, keep in head_keep.items():
        if arch in LLAMAS:
            q, kv = kept_query_and_kv(keep, N_KV)
            bias = arch == "qwen2"  # q, k, v biases; no o bias
            removed += (HEADS - q) * (2 * hd * D + (hd if bias else 0))  # q rows (+bias) + o columns
            removed += (N_KV - kv) * (2 * hd * D + (2 * hd if bias else 0))  # k and v rows (+biases)
        else:
            kept = max(1, int(keep.sum()))
            per_head = 4 * hd * D + (0 if arch.startswith("t5") else 3 * hd)  # q, k, v rows (+biases), o columns
            removed += (HEADS - kept) * per_head
    if arch.startswith("t5"):  # relative-bias columns of heads no self-attention of the stack keeps
        buckets = model.config.relative_attention_num_buckets
        for stack in ("encoder", "decoder"):
            union = set()
            for site, keep in head_keep.items():
                if site.startswith(stack) and "SelfAttention" in site:
                    union |= set(keep.nonzero().flatten().tolist()) or {0}
            removed += buckets * (HEADS - len(union))
    per_neuron = {"llama": 3 * D, "mistral": 3 * D, "qwen2": 3 * D, "t5": 2 * D, "t5-gated": 3 * D}.get(arch, 2 * D + 1)
    removed += per_neuron * sum(int((~k).sum()) for k in neuron_keep.values())
    return removed


# ---------------------------------------------------------------------------------------------
# heads and neurons, every preset


def head_case(arch: str, case: str, n_sites: int, g: torch.Generator) -> List[Tensor]:
    keeps = []
    for i in range(n_sites):
        k = torch.ones(HEADS, dtype=torch.bool)
        drop = torch.randperm(HEADS, generator=g)[: int(torch.randint(1, HEADS, (1,), generator=g))]
        k[drop] = False  # some heads of every layer go, at least one stays
        keeps.append(k)
    if case == "whole_layer":
        keeps[0][:] = False
    elif case == "gqa":  # layer 0: KV group 0 goes (heads 0, 1); layer 1: head 3 goes -> placeholder
        keeps[0] = torch.tensor([False, False, True, True])
        keeps[1] = torch.tensor([True, True, True, False])
    return keeps


CASES = [(a, "random") for a in ARCHS] + [(a, "whole_layer") for a in ARCHS] + [(a, "gqa") for a in LLAMAS]


@pytest.mark.parametrize("arch,case", CASES)
def test_pruned_equals_input_masked_dense_model(arch: str, case: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(arch).eval()
    hd = head_dim_of(arch)
    batch, _ = make_batch(arch, torch.Generator().manual_seed(7))
    head_sites, neuron_sites = sites_of(model, HEAD_SITE[arch]), sites_of(model, NEURON_SITE[arch])
    layout = BlockLayout.from_model(model)
    assert [n for n, _ in layout.sites["head"]] == head_sites and [n for n, _ in layout.sites["neuron"]] == neuron_sites
    g = torch.Generator().manual_seed(zlib.crc32(f"{arch}/{case}".encode()))
    head_keep = dict(zip(head_sites, head_case(arch, case, len(head_sites), g)))
    neuron_keep = {n: torch.rand(FFN, generator=g) > 0.3 for n in neuron_sites}
    neuron_keep[neuron_sites[0]][:3] = False
    channel = {n: k.float().repeat_interleave(hd) for n, k in head_keep.items()}
    channel.update({n: k.float() for n, k in neuron_keep.items()})
    dense = logits(model, batch)
    expect = with_hooks(model, input_mask_hooks(channel), lambda: logits(model, batch))
    assert (expect - dense).abs().max() > 1e-4  # the masks do change the output
    sel = Selection(torch.cat(list(head_keep.values())), torch.cat(list(neuron_keep.values())), None, 0.0, 1.0, 1.0,
                    layout)
    before = count_parameters(model)
    report = prune_model(model, sel)
    got = logits(model, batch)
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()
    # (b) the parameter drop, counted by hand from the shapes
    assert before - count_parameters(model) == hand_count_removed(arch, model, head_keep, neuron_keep)
    assert report.params_removed == before - count_parameters(model)
    assert report.neurons_removed == sum(int((~k).sum()) for k in neuron_keep.values())
    if case == "whole_layer":
        assert report.placeholder_heads >= 1
    if case == "gqa":
        assert (report.kv_heads_removed, report.placeholder_heads) == (1, 1)
    # the shapes the tracker reads afterwards are the kept counts
    new = BlockLayout.from_model(model)
    assert [c for _, c in new.sites["neuron"]] == [int(k.sum()) for k in neuron_keep.values()]
    # (c) save_pruned / load_pruned
    save_pruned(model, tmp_path / arch)
    again = load_pruned(tmp_path / arch)
    assert type(again) is type(model) and count_parameters(again) == count_parameters(model)
    assert torch.allclose(logits(again, batch), got, atol=1e-6)


@pytest.mark.parametrize("arch", ["t5", "llama", "gpt2"])
def test_generation_with_cache_matches_masked_model(arch: str) -> None:
    """The cached decoding path (T5: the shared position bias with past tokens) gives the masked model's tokens."""
    model = make_model(arch).eval()
    hd = head_dim_of(arch)
    g = torch.Generator().manual_seed(3)
    head_sites = sites_of(model, HEAD_SITE[arch])
    head_keep = dict(zip(head_sites, head_case(arch, "random", len(head_sites), g)))
    channel = {n: k.float().repeat_interleave(hd) for n, k in head_keep.items()}
    ids = torch.randint(2, VOCAB, (2, 5), generator=g)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expect = with_hooks(model, input_mask_hooks(channel), lambda: model.generate(ids, **kw))
    layout = BlockLayout.from_model(model)
    prune_model(model, Selection(torch.cat(list(head_keep.values())), None, None, 0.0, 1.0, 1.0, layout))
    assert torch.equal(model.generate(ids, **kw), expect)


# ---------------------------------------------------------------------------------------------
# hidden dimensions (BERT / RoBERTa / LLaMA family)


def kept_stats_norm(kind: str, keep: Tensor) -> Callable[..., Any]:
    """Forward hook replacing a LayerNorm / RMSNorm output by the norm over the kept dims only (others 0)."""
    def hook(mod: nn.Module, args: Tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]
        xk = x[..., keep].double()
        eps = mod.eps if kind == "layer" else mod.variance_epsilon
        if kind == "layer":
            y = (xk - xk.mean(-1, keepdim=True)) / torch.sqrt(xk.var(-1, unbiased=False, keepdim=True) + eps)
            y = y * mod.weight[keep].double() + mod.bias[keep].double()
        else:
            y = xk * torch.rsqrt(xk.pow(2).mean(-1, keepdim=True) + eps) * mod.weight[keep].double()
        out = torch.zeros_like(output)
        out[..., keep] = y.to(output.dtype)
        return out
    return hook


def hidden_reference_hooks(arch: str, model: nn.Module, keep: Tensor) -> List[Tuple[str, str, Callable[..., Any]]]:
    """The reference of docs/pruning.md: removed dims zero at every embedding, site and norm output; norms
    take their statistics over the kept dims."""
    m = keep.float()
    zero_out = lambda mod, args, out: out * m  # noqa: E731
    bert = arch in ("bert", "roberta")
    emb = r"embeddings\.(word|position|token_type)_embeddings" if bert else r"embed_tokens"
    hooks = [(n, "post", zero_out) for n in sites_of(model, emb)]
    hooks += [(n, "post", zero_out) for n in sites_of(model, HEAD_SITE[arch]) + sites_of(model, NEURON_SITE[arch])]
    for n, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            hooks.append((n, "post", kept_stats_norm("layer", keep)))
        elif type(mod).__name__.endswith("RMSNorm"):
            hooks.append((n, "post", kept_stats_norm("rms", keep)))
    return hooks


def hand_param_total(arch: str, model: nn.Module, d: int, heads: List[int], kv: List[int], ffn: List[int]) -> int:
    """Every parameter of the (pruned) model, from its sizes: d = hidden size kept, per layer heads / KV / neurons."""
    hd, labels, cfg = head_dim_of(arch), 3, model.config
    if arch in ("bert", "roberta"):
        total = (VOCAB + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d  # embeddings + LayerNorm
        for h, f in zip(heads, ffn):
            total += 3 * (h * hd * d + h * hd) + h * hd * d + d + 2 * d  # q, k, v (+b), o (+b), LayerNorm
            total += f * d + f + f * d + d + 2 * d  # intermediate (+b), output (+b), LayerNorm
        total += d * D + D  # pooler / classifier.dense: reads d kept dims, writes its own D outputs
        return total + labels * D + labels  # the classifier reads the pooler's D outputs
    bias = arch == "qwen2"
    total = VOCAB * d + d  # embed_tokens + final norm
    for h, k, f in zip(heads, kv, ffn):
        total += h * hd * d + 2 * k * hd * d + h * hd * d + 3 * f * d + 2 * d
        total += (h * hd + 2 * k * hd) if bias else 0
    return total + (0 if cfg.tie_word_embeddings else VOCAB * d)  # lm_head (tied: the embedding)


HIDDEN_ARCHS = ["bert", "roberta", "llama", "mistral", "qwen2", "llama-tied"]


@pytest.mark.parametrize("name", HIDDEN_ARCHS)
def test_hidden_pruning_equals_kept_stats_reference(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    arch = "llama" if name == "llama-tied" else name
    model = make_model(arch).eval()
    if name == "llama-tied":
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2,
                                                   num_attention_heads=HEADS, num_key_value_heads=N_KV,
                                                   intermediate_size=FFN, tie_word_embeddings=True)).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    hd = head_dim_of(arch)
    batch, _ = make_batch(arch, torch.Generator().manual_seed(8))
    assert count_parameters(model) == hand_param_total(arch, model, D, [HEADS, HEADS], [N_KV, N_KV] if arch in LLAMAS
                                                       else [HEADS, HEADS], [FFN, FFN])  # the formula, dense
    g = torch.Generator().manual_seed(11)
    keep = torch.ones(D, dtype=torch.bool)
    keep[torch.randperm(D, generator=g)[:7]] = False
    head_sites, neuron_sites = sites_of(model, HEAD_SITE[arch]), sites_of(model, NEURON_SITE[arch])
    head_keep = {head_sites[0]: torch.tensor([True, True, False, True] if arch not in LLAMAS else [False, False, True, True]),
                 head_sites[1]: torch.ones(HEADS, dtype=torch.bool)}
    neuron_keep = {n: torch.rand(FFN, generator=g) > 0.25 for n in neuron_sites}
    channel = {n: k.float().repeat_interleave(hd) for n, k in head_keep.items()}
    channel.update({n: k.float() for n, k in neuron_keep.items()})
    layout = BlockLayout.from_model(model)
    sel = Selection(torch.cat(list(head_keep.values())), torch.cat(list(neuron_keep.values())), keep, 0.0, 1.0, 1.0, layout)
    expect = with_hooks(model, input_mask_hooks(channel) + hidden_reference_hooks(arch, model, keep),
                        lambda: logits(model, batch))
    only_hidden = Selection(None, None, keep, 0.0, 1.0, 1.0, layout)
    with apply_masks(model, only_hidden):  # the plain hidden mask: site outputs zeroed, nothing else
        plain = logits(model, batch)
    physical_hidden_only = make_model(arch).eval() if name != "llama-tied" else None
    report = prune_model(model, sel)
    got = logits(model, batch)
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()
    assert report.hidden_removed == 7 and model.config.hidden_size == D
    heads = [HEADS - 1, HEADS] if arch not in LLAMAS else [2, HEADS]
    kv = [HEADS - 1, HEADS] if arch not in LLAMAS else [1, N_KV]
    assert count_parameters(model) == hand_param_total(arch, model, D - 7, heads, kv,
                                                       [int(k.sum()) for k in neuron_keep.values()])
    if name == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.in_features == D - 7
    save_pruned(model, tmp_path / name)
    again = load_pruned(tmp_path / name)
    assert count_parameters(again) == count_parameters(model)
    assert torch.allclose(logits(again, batch), got, atol=1e-6)
    if physical_hidden_only is not None:  # the documented distance: physical hidden pruning vs the plain mask
        prune_model(physical_hidden_only, Selection(None, None, keep, 0.0, 1.0, 1.0, BlockLayout.from_model(
            physical_hidden_only)))
        phys = logits(physical_hidden_only, batch)
        with torch.no_grad():
            dense = logits(make_model(arch).eval(), batch)
        assert (phys - plain).abs().max() > 1e-3  # not the same model: docs/pruning.md says why and how far
        assert (phys - dense).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# errors: clear, and the model unchanged


def sel_for(model: nn.Module, hidden_drop: int = 0, **kw: Any) -> Selection:
    lay = BlockLayout.from_model(model)
    hidden = None
    if hidden_drop:
        hidden = torch.ones(lay.d_model, dtype=torch.bool)
        hidden[:hidden_drop] = False
    return Selection(kw.get("head"), kw.get("neuron"), hidden, 0.0, 1.0, 1.0, lay)


def test_errors_leave_the_model_unchanged() -> None:
    bert, llama = make_model("bert").eval(), make_model("llama").eval()
    def heads_and(model: nn.Module, hidden_drop: int) -> Selection:
        """Heads and neurons that are fine, then hidden dims that are refused: planned cuts must not be applied."""
        lay = BlockLayout.from_model(model)
        h = torch.ones(lay.num_blocks("head"), dtype=torch.bool)
        h[::3] = False
        n = torch.ones(lay.num_blocks("neuron"), dtype=torch.bool)
        n[::5] = False
        return sel_for(model, hidden_drop, head=h, neuron=n)

    gpt2, t5, vit = make_model("gpt2"), make_model("t5"), make_model("vit")
    cases: List[Tuple[nn.Module, Selection, str]] = [
        (llama, sel_for(bert, head=torch.zeros(2 * HEADS, dtype=torch.bool)), "not in this model|another model"),
        (gpt2, heads_and(gpt2, 2), r"hidden dimensions physically for .*'gpt2'"),
        (t5, heads_and(t5, 1), r"hidden dimensions physically for .*'t5'"),
        (vit, heads_and(vit, 1), r"hidden dimensions physically for .*'vit'"),
    ]
    torch.manual_seed(0)
    mlm = tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                                           intermediate_size=FFN))
    cases.append((mlm, heads_and(mlm, 3), r"model classes .*BertForMaskedLM"))
    extra = make_model("bert")
    extra.side = nn.Linear(D, 5)  # a module the table does not place
    cases.append((extra, heads_and(extra, 3), r"module 'side'"))
    # pruned since: the last layer's FFN is already smaller, so the last neuron site fails after the
    # head sites and the first neuron site have been checked
    since = make_model("opt")
    lay = BlockLayout.from_model(since)
    drop_last = torch.ones(2 * FFN, dtype=torch.bool)
    drop_last[-1] = False
    prune_model(since, Selection(None, drop_last, None, 0.0, 1.0, 1.0, lay))
    cases.append((since, Selection(torch.tensor([False, True, True, True] * 2), torch.ones(2 * FFN, dtype=torch.bool),
                                   None, 0.0, 1.0, 1.0, lay), "pruned since"))
    for model, sel, msg in cases:
        snap = snapshot(model)
        classes = [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=msg):
            prune_model(model, sel)
        assert_unchanged(model, snap)
        assert [type(m) for m in model.modules()] == classes
    seq = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    custom = BlockLayout.from_model(seq, {"architecture": "custom", "sites": {"neurons": "1"}})
    with pytest.raises(ValueError, match="supports the presets"):
        prune_model(seq, Selection(None, torch.zeros(8, dtype=torch.bool), None, 0.0, 1.0, 1.0, custom))


def test_corrupt_or_foreign_pruning_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model("gpt2").eval()
    save_pruned(model, tmp_path / "m")
    rec = tmp_path / "m" / PRUNING_FILE
    good = rec.read_text(encoding="utf-8")
    rec.write_text(good[: len(good) // 2], encoding="utf-8")  # truncated
    with pytest.raises(ValueError, match=r"apt_pruning\.json.*line \d+.*save_pruned") as info:
        load_pruned(tmp_path / "m")
    assert str(rec) in str(info.value)
    rec.write_text('{\n "format": "apt_salience.pruning/1",\n "heads": {,}\n}', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        load_pruned(tmp_path / "m")
    for fmt, msg in (("apt_salience.pruning/9", "version 9.*reads versions 1 to 2"),
                     ("something/else", "not an apt_salience pruning record")):
        rec.write_text(json.dumps({**json.loads(good), "format": fmt}), encoding="utf-8")
        with pytest.raises(ValueError, match=msg):
            load_pruned(tmp_path / "m")
    rec.write_text(json.dumps({**json.loads(good), "heads": {"h.9.attn.c_proj": {"heads": 1}}}), encoding="utf-8")
    with pytest.raises(ValueError, match="malformed|does not have"):
        load_pruned(tmp_path / "m")


def test_version_1_records_still_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What save_pruned wrote before format 2 (BERT / LLaMA heads and neurons only) still loads."""
    model = make_model("llama").eval()
    batch, _ = make_batch("llama", torch.Generator().manual_seed(2))
    lay = BlockLayout.from_model(model)
    prune_model(model, Selection(torch.tensor([False, False, True, True, True, False, True, True]),
                                 torch.arange(2 * FFN) % 3 > 0, None, 0.0, 1.0, 1.0, lay))
    save_pruned(model, tmp_path / "m")
    rec = json.loads((tmp_path / "m" / PRUNING_FILE).read_text(encoding="utf-8"))
    v1 = {"format": "apt_salience.pruning/1", "architecture": "llama", "heads": rec["heads"], "neurons": rec["neurons"]}
    (tmp_path / "m" / PRUNING_FILE).write_text(json.dumps(v1), encoding="utf-8")
    again = load_pruned(tmp_path / "m")
    assert torch.allclose(logits(again, batch), logits(model, batch), atol=1e-6)


def test_pruning_twice_composes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A second prune of a pruned T5 (shared bias already cut) equals pruning the union at once."""
    model, once = make_model("t5").eval(), make_model("t5").eval()
    batch, _ = make_batch("t5", torch.Generator().manual_seed(4))
    n_sites = len(BlockLayout.from_model(model).sites["head"])
    first = torch.ones(n_sites * HEADS, dtype=torch.bool)
    first[[0, 4, 5, 9]] = False
    prune_model(model, sel_for(model, head=first))
    lay2 = BlockLayout.from_model(model)
    second = torch.ones(lay2.num_blocks("head"), dtype=torch.bool)
    # site 0 keeps original heads 1, 2, 3 (positions 0-2), site 1 keeps 2, 3 (positions 3, 4): drop original 1 and 2
    second[[0, 3]] = False
    prune_model(model, Selection(second, None, None, 0.0, 1.0, 1.0, lay2))
    both = first.clone()
    both[[1, HEADS + 2]] = False
    prune_model(once, sel_for(once, head=both))
    assert torch.allclose(logits(model, batch), logits(once, batch), atol=1e-6)
    assert count_parameters(model) == count_parameters(once)
    save_pruned(model, tmp_path / "t5")
    assert torch.allclose(logits(load_pruned(tmp_path / "t5"), batch), logits(once, batch), atol=1e-6)


def test_pruned_t5_trains_with_checkpointing_and_a_refreshed_tracker() -> None:
    import apt_salience

    model = make_model("t5")
    batch, _ = make_batch("t5", torch.Generator().manual_seed(5))
    tracker = apt_salience.attach(model, {"ema_beta": 0.0})
    lay = BlockLayout.from_model(model)
    heads = torch.ones(lay.num_blocks("head"), dtype=torch.bool)
    heads[[0, 1, 5, 12]] = False
    prune_model(model, Selection(heads, None, None, 0.0, 1.0, 1.0, lay))
    tracker.refresh()
    model.gradient_checkpointing_enable()
    model.train()
    model(**batch).loss.backward()
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.shape == (model.config.relative_attention_num_buckets, HEADS - 1)  # head 1 is gone from both layers
    assert bias.grad is not None and torch.isfinite(bias.grad).all() and bias.grad.abs().sum() > 0
    assert tracker.step()
    s = tracker.scores()
    tracker.detach()
    assert [c for _, c in s.head.sites] == [2, 3, 4, 3]
    assert bool((s.head.salience > 0).all())
