import json
import math

import pytest

from headwise.data_builders import DataError, corpus_qa_dataset, load_sft_dataset, normalize_sft_row
from headwise.data_builders.sft import corpus_qa_pool

U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}


def test_messages_format_splits_at_last_assistant_turn():
    row = {"messages": [{"role": "system", "content": "Be brief."}, U, A,
                        {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No.", "name": "x"}]}
    out = normalize_sft_row(row)
    assert out["prompt"] == row["messages"][:4]
    assert out["completion"] == [{"role": "assistant", "content": "No."}]  # extra keys dropped


def test_prompt_completion_strings_and_lists():
    assert normalize_sft_row({"prompt": "Hi?", "completion": "Hello.", "system": "Be brief."}) == {
        "prompt": [{"role": "system", "content": "Be brief."}, U], "completion": [A]}
    assert normalize_sft_row({"prompt": [U], "completion": [A]}) == {"prompt": [U], "completion": [A]}


@pytest.mark.parametrize("row, pattern", [
    ({"question": "q", "answer": "a"}, r"row 3: rows must have.*fields found: \['answer', 'question'\]"),
    ({"messages": [U]}, r"row 3: 'messages' has no assistant turn"),
    ({"messages": [U, {"role": "robot", "content": "x"}]}, r"row 3.*unknown role 'robot'"),
    ({"messages": [U, {"role": "assistant"}]}, r"row 3.*'role' and 'content'"),
    ({"prompt": [U], "completion": [U]}, r"row 3: 'completion' must start with an assistant message"),
    ({"prompt": "q", "completion": 5}, r"row 3.*'completion'.*list of messages"),
])
def test_bad_rows(row, pattern):
    with pytest.raises(DataError, match=pattern):
        normalize_sft_row(row, 3)


def test_load_sft_files(tmp_path):
    rows = [{"messages": [U, A]}, {"prompt": "Q2", "completion": "A2"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_sft_dataset(files=[str(path)])
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0] == {"prompt": [U], "completion": [A]}
    assert ds[1]["completion"] == [{"role": "assistant", "content": "A2"}]
    assert len(load_sft_dataset(files=[str(path)], limit=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [U, A]}) + "\n" + json.dumps({"instruction": "x", "output": "y"}))
    with pytest.raises(DataError, match=r"bad\.jsonl.*row 1.*fields found"):
        load_sft_dataset(files=[str(bad)])


def test_corpus_qa_dataset():
    ds = corpus_qa_dataset(20, seed=0)
    assert len(ds) == 20 and ds["prompt"] == corpus_qa_dataset(20, seed=0)["prompt"]
    assert ds["prompt"] != corpus_qa_dataset(20, seed=1)["prompt"]
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and "`" in row["prompt"][0]["content"]
    assert row["completion"][0]["role"] == "assistant"
    # Small n asks about modules first; answers are the module docstring's first sentence.
    summaries = {name: s for name, what, s in corpus_qa_pool() if what == "module"}
    for r in ds:
        name = r["prompt"][0]["content"].split("`")[1]
        assert r["completion"][0]["content"] == summaries[name]
    # Only train-split documents: eval modules are never asked about.
    eval_names = {n for n, _, _ in corpus_qa_pool("eval")}
    big = corpus_qa_dataset(2000)
    assert not {r["prompt"][0]["content"].split("`")[1] for r in big} & eval_names
    with pytest.raises(DataError, match="between 1 and"):
        corpus_qa_dataset(10**6)


def test_sft_trainer_puts_loss_on_answers_only(smollm2_tokenizer, tmp_path):
    """Run TRL's own tokenisation + collation on our data; labels must cover exactly the answers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok)))
    data = corpus_qa_dataset(6)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], max_length=128, bf16=False,
                     per_device_train_batch_size=3, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.args.completion_only_loss in (None, True)

    for i, processed in enumerate(trainer.train_dataset):
        answer = data[i]["completion"][0]["content"]
        ids = processed["input_ids"]
        # TRL >= 1.x folds completion_mask into dataset labels; older versions keep the mask column.
        if "labels" in processed:
            trained = [l != -100 for l in processed["labels"]]
        else:
            trained = [bool(m) for m in processed["completion_mask"]]
        first = trained.index(True)
        assert all(trained[first:]) and not any(trained[:first])  # one contiguous suffix
        completion_text = tok.decode(ids[first:])
        assert completion_text.startswith(answer)
        # After the answer only the template's end-of-turn tokens are trained.
        assert completion_text[len(answer):].strip() in ("<|im_end|>", tok.eos_token)
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
        assert data[i]["prompt"][0]["content"] in tok.decode(ids[:first])

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row in range(2):
        mask = batch["labels"][row] != -100
        answer = data[row]["completion"][0]["content"]
        assert tok.decode(batch["input_ids"][row][mask]).startswith(answer)
    loss = trainer.train().training_loss
    assert math.isfinite(loss)
