"""The README's support table is what the tests show, cell by cell (support_table.py)."""

from support_table import CAPABILITIES, VISION_LANGUAGE, README, coverage, readme_with_table


def test_readme_support_table_is_generated_from_the_tests():
    """Regenerate with `python tests/support_table.py` when a test starts or stops covering a cell."""
    text = README.read_text(encoding="utf-8")
    assert readme_with_table(text) == text, "README.md's support table is stale: run python tests/support_table.py"


def test_every_capability_is_shown_on_the_embedded_model_and_a_hybrid_moe_checkpoint():
    """The two ends of the table are tested in every column: the 2024 dense model and a Qwen3.5-MoE checkpoint."""
    cells = coverage()
    for model_type in ("qwen2", "qwen3_5_moe"):
        applicable = [c for c in CAPABILITIES if c != "images" or model_type in VISION_LANGUAGE]  # qwen2 reads text only
        assert [c for c in applicable if (model_type, c) not in cells] == [], model_type
