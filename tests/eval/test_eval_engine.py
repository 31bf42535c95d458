"""adapterkit.eval on the real serving engine with a tiny random Llama and real LoRA files.

References are independent of the engine: the HF model's own forward (``log_softmax`` of
``model(ids).logits`` in fp32, adapter attached in Python with ``ak.load_adapter``) for
scores, and HF ``generate`` with the adapter attached for greedy answers.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import adapterkit as ak
import adapterkit.eval as ev
from adapterkit.demo import render_prompt
from adapterkit.errors import ConfigError, DataError

from _eval_utils import char_tokenizer, save_lora, tiny_llama

TOL = 1e-4
ADAPTERS = {"a": ("adapterkit", 1), "b": ("peft", 2), "c": ("adapterkit", 3)}

MC = ev.TaskSpec(name="mc", kind="multiple_choice", metric="acc", examples=[
    {"prompt": "Which is a fruit?", "choices": ["pear", "hammer", "bus"], "answer": 0},
    {"prompt": "Odd one out: red, blue, cat", "choices": ["red", "cat"], "answer": 1},
    {"prompt": "2 + 2 =", "choices": [" 4", " 22", " four"], "answer": 0},
])
PPL = ev.TaskSpec(name="ppl", kind="perplexity", metric="perplexity", examples=[
    {"text": "The quick brown fox jumps."},
    {"prompt": "Translate: chat", "completion": " cat"},
])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, tok = tiny_llama(), char_tokenizer()
    paths = {n: save_lora(model, root / n, r=4, seed=s, fmt=f) for n, (f, s) in ADAPTERS.items()}
    return model, tok, paths


def reference(model, path):
    m = copy.deepcopy(model)
    if path is not None:
        ak.load_adapter(m, path)
    return m.eval()


def ref_sum(m, ids: list[int], start: int) -> tuple[float, int]:
    """Summed log-prob of ids[start:] given what precedes them (fp32), and the token count."""
    with torch.no_grad():
        lp = m(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    pos = torch.arange(start, len(ids))
    return lp[pos - 1, torch.tensor(ids[start:])].sum().item(), len(ids) - start


def test_scores_equal_the_model_forward(setup):
    model, tok, paths = setup
    res = ev.evaluate(model, tok, [MC, PPL], paths, progress=False)
    for name in ["base", *paths]:
        m = reference(model, paths.get(name))
        for e, rec in enumerate(MC.examples):
            ctx = tok(render_prompt(tok, rec["prompt"]), add_special_tokens=False)["input_ids"]
            want = [ref_sum(m, ctx + tok(c, add_special_tokens=False)["input_ids"], len(ctx))[0]
                    for c in rec["choices"]]
            assert res.logliks[name]["mc"][e] == pytest.approx(want, abs=TOL), (name, e)
            best = max(range(len(want)), key=lambda i: want[i])
            norm = max(range(len(want)), key=lambda i: want[i] / len(rec["choices"][i]))
            assert (best, norm) == ev.mc_predict(want, [len(c) for c in rec["choices"]])
        acc = sum(max(range(len(r["choices"])), key=lambda i: res.logliks[name]["mc"][e][i]) == r["answer"]
                  for e, r in enumerate(MC.examples)) / 3
        assert res.scores[name]["mc"]["acc"] == acc
        text_ids = tok(PPL.examples[0]["text"])["input_ids"]
        ctx = tok("Translate: chat")["input_ids"]
        spans = [ref_sum(m, text_ids, 1), ref_sum(m, ctx + tok(" cat", add_special_tokens=False)["input_ids"], len(ctx))]
        for got, want in zip(res.logliks[name]["ppl"], spans):
            assert got[0] == pytest.approx(want[0], abs=TOL) and got[1] == want[1]
        want_ppl = math.exp(-sum(s for s, _ in spans) / sum(n for _, n in spans))
        assert res.scores[name]["ppl"]["perplexity"] == pytest.approx(want_ppl, rel=1e-4)
    # the adapters are applied: their scores differ from the base's
    assert res.logliks["a"]["mc"][0] != pytest.approx(res.logliks["base"]["mc"][0], abs=1e-3)


def test_greedy_answers_equal_hf_generate_for_many_adapters_in_one_pass(setup):
    model, tok, paths = setup
    spec = ev.load_task("dates", n=4, max_tokens=10, stop=())
    res = ev.evaluate(model, tok, [spec], paths, progress=False)
    for name in ["base", *paths]:
        m = reference(model, paths.get(name))
        for e, rec in enumerate(spec.examples):
            ids = tok(render_prompt(tok, rec["prompt"]), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = m.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
            assert res.predictions[name]["dates"][e] == want, (name, e)
    hits = [sum(p.strip() == r["completion"] for p, r in zip(res.predictions["a"]["dates"], spec.examples)) / 4]
    assert res.scores["a"]["dates"]["exact_match"] == hits[0]
    # heterogeneous batching: some forward steps held the rows of several models
    assert res.batching.mixed_steps > 0 and res.batching.max_models_per_step >= 3, res.batching


def test_report_files(setup, tmp_path):
    model, tok, paths = setup
    res = ev.evaluate(model, tok, [MC, ev.load_task("sentiment", n=3, max_tokens=4)], paths, progress=False)
    files = ev.write_report(res, tmp_path / "out", predictions=True)
    data = json.loads(files["json"].read_text())
    assert data["schema"] == "adapterkit.eval/1"
    assert set(data) >= {"model", "seconds", "batching", "tasks", "models", "predictions"}
    assert data["tasks"] == {"mc": {"kind": "multiple_choice", "metric": "acc"},
                             "sentiment": {"kind": "generate", "metric": "exact_match"}}
    assert set(data["models"]) == {"base", "a", "b", "c"} and data["models"]["base"]["params"] == 0
    assert data["models"]["a"]["params"] == sum(t.numel() for t in ak.formats.read_adapter(paths["a"]).tensors.values())
    assert set(data["models"]["b"]["scores"]["mc"]) == {"acc", "acc_norm", "n"}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = ev.format_table(res)
    assert table.splitlines()[0].startswith("| model") and len(table.splitlines()) == 2 + 4


def test_task_files_and_bad_input(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"prompt": "Q", "choices": ["x", "y"], "answer": 1}\n')
    spec = ev.load_task(tmp_path / "q.jsonl")
    assert (spec.kind, spec.metric, spec.name) == ("multiple_choice", "acc", "q")
    (tmp_path / "t.json").write_text(json.dumps({"data": "g.jsonl", "metric": "numeric", "max_tokens": 5,
                                                 "template": "Q: {prompt}"}))
    (tmp_path / "g.jsonl").write_text('{"prompt": "1+1", "completion": "2"}\n\n')
    spec = ev.load_task(tmp_path / "t.json")
    assert (spec.kind, spec.metric, spec.max_tokens, spec.prompt(spec.examples[0])) == ("generate", "numeric", 5, "Q: 1+1")
    assert (ev.load_task("arithmetic", n=5).metric, ev.load_task("arithmetic", n=5).stop) == ("numeric", ())
    assert ev.load_task("commonsense_mc", n=5).kind == "multiple_choice"
    with pytest.raises(ConfigError, match="arithmetic"):
        ev.load_task("arithmetc")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Q", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(DataError, match="'answer' must be an index"):
        ev.load_task(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"prompt": "Q"}\n')
    with pytest.raises(DataError, match="missing the key 'completion'"):
        ev.load_task(tmp_path / "bad2.jsonl")
    (tmp_path / "bad3.jsonl").write_text('{"prompt": "Q"\n')
    with pytest.raises(DataError, match="bad3.jsonl:1: not valid JSON"):
        ev.load_task(tmp_path / "bad3.jsonl")
    with pytest.raises(ConfigError, match="metric"):
        ev.load_task(tmp_path / "g.jsonl", metric="acc")
    with pytest.raises(ConfigError, match="known fields"):
        ev.load_task(tmp_path / "g.jsonl", temperature=1)
    with pytest.raises(DataError, match="neither a built-in task nor a file"):
        ev.load_task(tmp_path / "nope.jsonl")


def test_no_models_or_reserved_name(setup):
    model, tok, paths = setup
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        ev.evaluate(model, tok, [MC], {}, include_base=False, progress=False)
    with pytest.raises(ConfigError, match="reserved"):
        ev.evaluate(model, tok, [MC], {"base": paths["a"]}, progress=False)


def test_cli_eval(setup, tmp_path, capsys):
    from adapterkit.cli import main

    model, tok, paths = setup
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc = main(["eval", "--model", str(tmp_path / "m"), "--adapter", f"x={paths['a']}", "--adapter", str(paths["b"]),
               "--task", "sentiment", "--task", "commonsense_mc", "--limit", "2", "--out", str(tmp_path / "o"),
               "--no-progress", "--predictions"])
    out = capsys.readouterr().out
    assert rc == 0 and "| model" in out and "forward steps mixed models" in out
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(data["models"]) == {"base", "x", "b"} and len(data["predictions"]["x"]["sentiment"]) == 2
    assert (tmp_path / "o" / "results.png").is_file()
    rc = main(["eval", "--model", str(tmp_path / "m"), "--task", "sentimnt", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "sentiment" in capsys.readouterr().err


def test_fewer_slots_and_a_small_window_give_the_same_scores(setup):
    """One adapter slot for three adapters (they take turns) and 3 requests in flight at a time:
    the same log-likelihoods as the roomy default."""
    from adapterkit.serve.types import EngineConfig

    model, tok, paths = setup
    roomy = ev.evaluate(model, tok, [MC], paths, progress=False)
    tight = ev.evaluate(model, tok, [MC], paths, progress=False, window=3,
                        engine_config=EngineConfig(max_loras=1, max_lora_rank=4, max_model_len=256))
    for name in roomy.logliks:
        for got, want in zip(tight.logliks[name]["mc"], roomy.logliks[name]["mc"], strict=True):
            assert got == pytest.approx(want, abs=TOL), name
    assert tight.batching.max_models_per_step <= 2  # one adapter slot (+ the base rows)


def test_an_adapter_for_another_base_is_refused_by_name(setup, tmp_path):
    from adapterkit.errors import AdapterError

    model, tok, _ = setup
    other = save_lora(tiny_llama(hidden=32), tmp_path / "other", r=4, seed=0)
    with pytest.raises(AdapterError, match=r"adapter .other. \(.*other\):.*this base needs"):
        ev.evaluate(model, tok, [MC], {"other": other}, progress=False)
