"""Budgets named by presets and a default menu that holds every human rule (issue 24, items 1 and 5)."""

from __future__ import annotations

import pytest

from qenv import load_model
from qenv.envs.spaces import COMPACT_MENU, DEFAULT_MENU, MENUS, ActionMapper
from qenv.errors import QenvError
from qenv.models.layers import LayerInfo
from qenv.quant.accounting import bits_per_weight
from qenv.quant.presets import budget_label, human_preset_name, parse_budget, preset, resolve_budget
from qenv.quant.presets import menu_table
from qenv.quant.rules import Rule

UNIFORM_BITS = (2, 3, 4, 5, 6, 8)


def uniform_preset_names() -> list[str]:
    """Every uniform human preset the default menu must express: rtn/gptq/awq at every bit width with the
    presets' default group of 128, and at 2 and 3 bits with the -g64/-g32 groups the presets use there."""
    names = [f"{family}-w{bits}" for family in ("rtn", "gptq", "awq") for bits in UNIFORM_BITS]
    names += [f"{family}-w{bits}-g{group}" for family in ("rtn", "gptq", "awq") for bits in (2, 3)
              for group in (64, 32)]
    return names


@pytest.fixture(scope="module")
def default_layers():
    return load_model("default", device="cpu").layers


@pytest.mark.parametrize("name", uniform_preset_names())
def test_every_uniform_preset_is_a_default_menu_entry(name, default_layers):
    recipe = preset(name, default_layers)
    rules = set(recipe.values())
    assert len(rules) == 1
    (rule,) = rules
    assert rule in DEFAULT_MENU, f"{name} ({rule.label()}) is not on the default menu"
    assert human_preset_name(rule) == name.removesuffix("-g128")
    # the discrete kind can pick it: its index names that rule
    mapper = ActionMapper("discrete")
    assert mapper.to_rule(DEFAULT_MENU.index(rule)) == rule


def test_default_menu_has_the_combined_gptq_rules():
    for bits in (2, 3, 4):
        assert Rule(bits=bits, group_size=128, rounding="gptq", act_scale=0.5) in DEFAULT_MENU  # AWQ then GPTQ
        assert Rule(bits=bits, group_size=128, rounding="gptq", mse_clip=True) in DEFAULT_MENU  # GPTQ, MSE clip
    assert len(set(DEFAULT_MENU)) == len(DEFAULT_MENU)


def test_compact_menu_keeps_the_old_indices():
    """The 13 rules of the old default menu lead the new one in the same order, and stay a named menu."""
    assert DEFAULT_MENU[:len(COMPACT_MENU)] == COMPACT_MENU
    assert len(COMPACT_MENU) == 13 and MENUS["compact"] is COMPACT_MENU
    assert ActionMapper("discrete", "compact").space.n == 13
    assert ActionMapper("discrete").space.n == len(DEFAULT_MENU)


def test_menu_table_lists_each_rule_with_its_bpw():
    text = menu_table(DEFAULT_MENU)
    lines = text.strip().splitlines()
    assert len(lines) == len(DEFAULT_MENU) + 4  # rule, header, rule, rows, rule
    by_label = {line.split()[1]: line for line in lines[3:-1]}
    assert set(by_label) == {r.label() for r in DEFAULT_MENU}
    assert by_label["w4g128a-gptq"].split()[2:] == ["gptq-w4", "4.156"]  # 4 + (16 + 4) / 128
    assert by_label["w2g32a-gptq"].split()[2:] == ["gptq-w2-g32", "2.562"]  # 2 + (16 + 2) / 32
    assert "(AWQ then GPTQ)" in by_label["w3g128a-gptq-awq0.5"]


# -- budgets named by presets ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["stories260K", "tiny-qwen2", "tiny-gpt2"])
@pytest.mark.parametrize("name", ["gptq-w4", "awq-w3", "q4_k_m-im"])
def test_preset_budget_is_the_presets_bpw(spec, name, stories_bin):
    """Three architectures (llama2.c, Qwen2, GPT-2's Conv1D layout): the budget is the preset's own size."""
    loaded = load_model(stories_bin if spec == "stories260K" else spec, device="cpu")
    bpw, named = resolve_budget(name, loaded.layers)
    assert named == name
    assert bpw == bits_per_weight(loaded.layers, preset(name, loaded.layers))
    assert budget_label(bpw, named) == f"{name} ({bpw:.3f} bpw)"
    if name == "gptq-w4":  # rows shorter than a group pay a scale and a zero point per row
        assert bpw > 4.156


def test_number_budget_stays_a_number():
    assert resolve_budget(3.0, []) == (3.0, None)
    assert resolve_budget("2.5", []) == (2.5, None)
    assert parse_budget("GPTQ-W4") == "gptq-w4"
    assert budget_label(3.0) == "3 bpw"


def test_unknown_preset_budget_lists_the_presets():
    with pytest.raises(QenvError) as err:
        parse_budget("no-such-preset")
    text = str(err.value)
    assert "no-such-preset" in text and "gptq-w4" in text and "q4_k_m-im" in text and "Fix:" in text


def test_preset_larger_than_16_bit_is_refused():
    # rows of 2 weights: each pays a 16-bit scale and an 8-bit zero point per 2 weights (8 + 12 bpw)
    layers = [LayerInfo("l", "q", 0, 1, out_features=4, in_features=2)]
    with pytest.raises(QenvError, match="more than keeping it in 16-bit"):
        resolve_budget("rtn-w8", layers)
