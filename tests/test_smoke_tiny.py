from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_has_default_special_tokens(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id != model.config.pad_token_id


def test_store_fixture_is_empty(engine) -> None:
    from sqlalchemy import func, select

    from dialoop.store import User, session_scope

    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(User)) == 0
