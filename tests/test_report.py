"""``apt_salience.cli.report``: the figures decode as PNGs; the Markdown summary against values computed here.

The reading is built by hand (values, parameter counts, sites), so every number of the summary is
known: densities, the budget cut (the largest prefix of the density order within the budget,
APT Eq. 13-14, found here by a loop), the top and bottom tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from apt_salience.cli.report import block_table, density_figure, render_report, site_label
from apt_salience.scores import BlockScores, SalienceScores
from apt_salience.selection import select_blocks
from tests._cli import check_png

HEAD_SITES = [("enc.layer.0.attention.output.dense", 2), ("enc.layer.1.attention.output.dense", 2)]
NEURON_SITES = [("enc.layer.0.output.dense", 2), ("enc.layer.1.output.dense", 2)]
HEAD_SAL, HEAD_PC = [4.0, 1.0, 2.0, 3.0], 32.0
NEURON_SAL, NEURON_PC = [1.0, 3.0, 0.1, 2.0], 8.0


def _block(sal: List[float], kurt: float, pc: float, sites: List[Tuple[str, int]]) -> BlockScores:
    s = torch.tensor(sal)
    return BlockScores.build(salience=s, kurtosis=torch.full((len(sal),), kurt), outlier_aware=s + kurt ** 0.5,
                             param_count=torch.full((len(sal),), pc), sites=sites)


def _scores() -> SalienceScores:
    return SalienceScores(step=3, d_model=4, head=_block(HEAD_SAL, 1.0, HEAD_PC, HEAD_SITES),
                          neuron=_block(NEURON_SAL, 1.0, NEURON_PC, NEURON_SITES),
                          hidden=_block([1.0, 2.0, 3.0, 4.0], 0.0, 24.0, [("hidden", 4)]))


def _blocks() -> List[Tuple[str, str, int, float, float, float]]:
    """(kind, site, index, salience, outlier-aware, parameters) of every head and neuron block, by hand."""
    out = []
    for kind, sal, pc, sites in (("head", HEAD_SAL, HEAD_PC, HEAD_SITES), ("neuron", NEURON_SAL, NEURON_PC, NEURON_SITES)):
        names = [(n, j) for n, c in sites for j in range(c)]
        out += [(kind, n, j, v, v + 1.0, pc) for (n, j), v in zip(names, sal)]
    return out


def test_render_report_figures_and_summary(tmp_path: Path) -> None:
    files = render_report(_scores(), tmp_path / "r", budget=0.5, top=2, title="hand-made")
    figures = ["head_salience", "head_kurtosis", "head_outlier_aware", "neuron_salience", "hidden_salience",
               "density_ranking"]
    assert sorted(files) == sorted(figures + ["summary", "scores"])
    for name in figures:
        assert files[name] == tmp_path / "r" / f"{name}.png"
        check_png(files[name])
    again = SalienceScores.load(files["scores"])
    assert again.head is not None and again.head.outlier_aware.tolist() == [5.0, 2.0, 3.0, 4.0]

    md = files["summary"].read_text()
    assert md.startswith("# hand-made\n")
    assert "optimizer step **3**" in md and "d_model = 4" in md and "`unknown`" in md  # no architecture recorded
    assert "- head: 4 blocks in 2 site(s), 128 parameters" in md
    assert "- neuron: 4 blocks in 2 site(s), 32 parameters" in md
    assert "- hidden: 4 blocks in 1 site(s), 24 parameters per hidden dim" in md
    # the budget cut, by hand: density order, the largest prefix within half of the 160 parameters
    blocks = sorted(_blocks(), key=lambda b: -b[4] / b[5])
    budget, used, kept = 0.5 * (4 * HEAD_PC + 4 * NEURON_PC), 0.0, {"head": 0, "neuron": 0}
    for kind, *_, pc in blocks:
        if used + pc > budget:
            break
        used += pc
        kept[kind] += 1
    assert (kept, used) == ({"head": 1, "neuron": 4}, 64.0)  # the hand numbers above, worked out on paper too
    assert (f"keeps {kept['head']}/4 heads, {kept['neuron']}/4 neurons = {used:,.0f} of 160 parameters") in md
    for name in figures:
        assert f"![{name}]({name}.png)" in md
    # top and bottom tables: rank, site, block, salience, kurtosis, outlier-aware, density
    for kind in ("head", "neuron"):
        mine = sorted([b for b in _blocks() if b[0] == kind], key=lambda b: -b[4] / b[5])
        n = len(mine)

        def row(rank: int, b: Tuple[str, str, int, float, float, float]) -> str:
            return f"| {rank} | `{b[1]}` | {b[2]} | {b[3]:.4g} | {1.0:.4g} | {b[4]:.4g} | {b[4] / b[5]:.4g} |"

        top = md.split(f"## {kind.capitalize()} blocks: top 2 by density")[1].split("##")[0]
        bottom = md.split(f"## {kind.capitalize()} blocks: bottom 2 by density")[1].split("##")[0]
        assert [line for line in top.splitlines() if line.startswith("| 1") or line.startswith("| 2")] == \
            [row(1, mine[0]), row(2, mine[1])]
        assert [line for line in bottom.splitlines() if line.startswith(f"| {n}") or line.startswith(f"| {n - 1}")] == \
            [row(n, mine[-1]), row(n - 1, mine[-2])]


def test_density_figure_marks_a_given_selection(tmp_path: Path) -> None:
    scores = SalienceScores(step=1, d_model=4, neuron=_block(NEURON_SAL, 0.0, NEURON_PC, NEURON_SITES))
    sel = select_blocks(scores, keep_ratio=0.25, kinds=("neuron",))
    assert sel.neuron is not None and sel.neuron.tolist() == [False, True, False, False]  # the top density of four
    p = density_figure(scores, tmp_path / "sub" / "d.png", selection=sel)
    check_png(p)
    with pytest.raises(ValueError, match="no head or neuron"):
        density_figure(SalienceScores(step=1, d_model=4, hidden=_block([1.0] * 4, 0.0, 1.0, [("hidden", 4)])),
                       tmp_path / "x.png")


@pytest.mark.parametrize("kwargs,match", [({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"),
                                          ({"budget": True}, "budget"), ({"top": 0}, "top"), ({"top": 2.0}, "top")])
def test_render_report_rejects_bad_arguments_before_writing(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_report(_scores(), tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_block_table_orders_ties_by_model_order() -> None:
    b = _block([2.0, 1.0, 2.0, 3.0], 0.0, 1.0, [("l.0.fc2", 4)])
    hi, lo = block_table(SalienceScores(step=1, neuron=b), "neuron", top=3)
    assert [(r["rank"], r["block"]) for r in hi] == [(1, 3), (2, 0), (3, 2)]
    assert [(r["rank"], r["block"]) for r in lo] == [(4, 1), (3, 2), (2, 0)]
    assert hi[0]["density"] == 3.0 and hi[0]["site"] == "l.0.fc2"
    assert block_table(SalienceScores(step=1, neuron=b), "head") == ([], [])


@pytest.mark.parametrize("name,layer,label", [
    ("bert.encoder.layer.3.attention.output.dense", "bert.encoder.layer.3", "L3"),
    ("model.layers.11.self_attn.o_proj", "model.layers.11", "L11"),
    ("transformer.h.0.mlp.c_proj", None, "L0"),
    ("decoder.block.1.layer.1.EncDecAttention.o", "decoder.block.1", "dec L1"),
    ("encoder.block.1.layer.0.SelfAttention.o", "encoder.block.1", "L1"),
    ("pooler.dense", None, "pooler.dense"),  # no layer index: the name itself
])
def test_site_label(name: str, layer: "str | None", label: str) -> None:
    assert site_label(name, layer) == label
