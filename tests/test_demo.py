"""adapterkit.demo on a tiny random Llama with a character tokenizer: the whole pipeline
(eval, train, save, reload, table) runs; accuracy is not checked (random weights)."""
from __future__ import annotations

import string

import pytest
import torch

import adapterkit as ak
from adapterkit import demo
from adapterkit.tasks import make_splits
from conftest import tiny_llama

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(chat: bool = True):
    """One token per character (+ specials), < 128 ids, built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>"]
    chars = string.ascii_letters + string.digits + " .,:-'"
    vocab = {t: i for i, t in enumerate(specials + list(chars))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()  # decode joins characters without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>",
                                  additional_special_tokens=specials[3:])
    if chat:
        tok.chat_template = CHAT
    assert len(tok) <= 128
    return tok


@pytest.mark.parametrize("chat", [True, False])
def test_demo_runs_end_to_end_on_tiny_model(tmp_path, chat):
    model, tok = tiny_llama(), char_tokenizer(chat)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines: list[str] = []
    res = demo.run(model, tok, steps=2, batch_size=2, n_train=8, n_eval=4, out_dir=tmp_path,
                   progress=False, log=lines.append)
    assert res.steps == 2 and res.n_heldout == 4 and res.n_train == 8
    assert res.trainable_params == ak.trainable_parameters(model, demo.ADAPTER_NAME) > 0
    for acc in (res.acc_base, res.acc_adapter, res.acc_reload):
        assert 0.0 <= acc <= 1.0
    # the saved adapter reloaded into a fresh base answers exactly like the trained model
    assert res.reload_identical and res.acc_reload == res.acc_adapter
    assert (res.adapter_dir / "adapter_config.json").is_file()
    # the base weights were not changed by training (only the adapter trains)
    after = {k: v for k, v in model.state_dict().items() if ".adapterkit." not in k}
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    table = res.table()
    for head in ("task", "n held-out", "acc base", "acc adapter", "acc reloaded", "train time", "trainable params"):
        assert head in table
    assert "dates" in table and f"{res.trainable_params:,}" in table
    text = demo.report(res)
    assert ("PASS" in text) == res.passed()
    assert any("held-out accuracy" in line for line in lines)


def test_training_records_match_inference_prompt():
    """The trainer's rendering of a record starts with exactly what inference sends."""
    from adapterkit.train import build_dataset

    tok = char_tokenizer()
    train, _ = make_splits("dates", 3, 1)
    recs = demo.training_records(train, tok)
    ds = build_dataset(recs, tok, None)
    ex = ds[0] if isinstance(ds[0], dict) else ds.examples[0]
    ids = ex["input_ids"] if isinstance(ex, dict) else ex.input_ids
    labels = ex["labels"] if isinstance(ex, dict) else ex.labels
    prompt_ids = tok(demo.render_prompt(tok, train[0]["prompt"]), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert (labels[: len(prompt_ids)] == -100).all()  # no loss on the prompt
    answer = tok.decode(ids[len(prompt_ids):], skip_special_tokens=True)
    assert answer == train[0]["completion"]


def test_greedy_answers_match_manual_argmax():
    """generate()-based greedy decoding equals a plain argmax loop (no KV cache, no padding)."""
    model, tok = tiny_llama(seed=5), char_tokenizer()
    prompts = ["Convert the date 2001-02-03.", "Hi"]
    got = demo.greedy_answers(model, tok, prompts, max_new_tokens=5)
    end = tok.convert_tokens_to_ids("<|end|>")
    for p, g in zip(prompts, got):
        ids = tok(demo.render_prompt(tok, p), return_tensors="pt", add_special_tokens=False)["input_ids"]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(ids).logits[0, -1].argmax())
                if nxt == end:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert g == tok.decode(new, skip_special_tokens=True)


def test_run_needs_tokenizer_and_known_task(tmp_path):
    with pytest.raises(ak.AdapterError, match="tokenizer"):
        demo.run(tiny_llama(), None, out_dir=tmp_path)
    with pytest.raises(ak.AdapterError, match="unknown task"):
        demo.run(tiny_llama(), char_tokenizer(), task="nope", out_dir=tmp_path)


def test_serve_flag_without_serve_package(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("adapterkit.serve"):
            raise ImportError("no serve here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert demo.main(["--serve", "--out", str(tmp_path)]) == 2
    assert "adapterkit.serve" in capsys.readouterr().err
