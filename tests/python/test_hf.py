"""Engram in Hugging Face transformers models (tiny, randomly initialised from their configs, no
hub download): insertion, zero change at init, training (plain loop and Trainer), generation with
the decode state equal to recomputation, and the save_pretrained / from_pretrained round trip."""

import pytest
import torch

import torch_engram as te

T = pytest.importorskip("transformers")
from torch_engram.integrations.transformers import (  # noqa: E402
    EngramCallback,
    add_engram,
    engram_modules,
    from_pretrained,
)

pytestmark = pytest.mark.usefixtures("one_thread")
V = 300


def tiny(kind: str):
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg = {
        "llama": lambda: T.LlamaConfig(**common),
        "qwen3": lambda: T.Qwen3Config(**common, head_dim=16),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
        ),
        "mixtral": lambda: T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    }[kind]()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg)


def engram_config():
    return te.EngramConfig(
        engram_vocab_size=(997, 1009), n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=(1, 2), pad_id=0
    )


LUT = torch.arange(V) % 211  # a stand-in compression: several ids share a compressed id
KINDS = ["llama", "qwen3", "qwen3_moe", "mixtral"]


@pytest.mark.parametrize("kind", KINDS)
def test_insert_train_generate_save_load(kind, tmp_path):
    model = tiny(kind)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    add_engram(model, engram_config(), tokenizer=None, lut=LUT, lr=2e-3, zero_init=True)
    keys = model.state_dict().keys()
    assert any(k.endswith("layers.1.engram.table.weight") for k in keys)
    assert any(k.endswith("engram_hasher.lut") for k in keys)
    assert len(engram_modules(model)) == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # zero_init: outputs unchanged at step 0
    # A plain training loop: the user's optimizer for everything; the tables learn in backward.
    table = engram_modules(model)[0].table
    assert table.lr == pytest.approx(1e-2) and table.weight_decay == 0.0
    w0 = table.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(4):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert table.weight.grad is None and not torch.equal(table.weight, w0)  # updated in backward
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, before)
    # Generation: with the KV cache and Engram state = recomputing every prefix.
    model.eval()
    prompt = ids[:, :6]
    mask = torch.ones_like(prompt)
    a = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    b = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape == (2, 18) and torch.equal(a, b)
    torch.manual_seed(3)
    a = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    b = model.generate(
        prompt, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, use_cache=False, pad_token_id=0
    )
    assert torch.equal(a, b)
    # save_pretrained / from_pretrained: outputs and table state bit for bit.
    model.save_pretrained(tmp_path)
    back = from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    t2 = engram_modules(back)[0].table
    for name in ("weight", "momentum1", "momentum2", "row_step", "step_count"):
        assert torch.equal(getattr(t2, name), getattr(table, name)), name
    assert t2.lr == table.lr
    c = back.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(c[:, :6], prompt) and c.shape == (2, 18)


def test_without_zero_init_the_model_changes_and_errors_name_the_problem():
    model = tiny("llama")
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    add_engram(model, engram_config(), lut=LUT)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="already has Engram layers"):
        add_engram(model, engram_config(), lut=LUT)
    with pytest.raises(ValueError, match="need input_ids"):
        model(inputs_embeds=torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match=r"layer_ids must lie in \[0, 3\)"):
        add_engram(tiny("llama"), engram_config(), layer_ids=(5,), lut=LUT)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no decoder layer list"):
        add_engram(gpt2, engram_config(), lut=LUT)


def test_trainer_with_the_callback(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny("qwen3_moe")
    add_engram(model, engram_config(), lut=LUT, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (x := torch.randint(0, V, (16,), generator=g)), "labels": x} for _ in range(8)]
    args = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    table = engram_modules(model)[0].table
    w0 = table.weight.detach().clone()
    seen = []

    class Spy(T.TrainerCallback):
        def on_step_end(self, args, state, control, lr_scheduler=None, **kw):
            seen.append((table.lr, lr_scheduler.get_last_lr()[0]))

    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[EngramCallback(), Spy()])
    trainer.train()
    assert not torch.equal(table.weight, w0)
    assert len(seen) == 4
    # Before each step the table took 5x the step's scheduled rate (the scheduler then moves on).
    lrs = [1e-3 * (1 - s / 4) for s in range(4)]
    assert [t for t, _ in seen] == pytest.approx([5 * lr for lr in lrs])


def test_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "hf_engram.py"
    spec = importlib.util.spec_from_file_location("hf_engram_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    got = example.main(["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--max-bytes", "300000",
                        "--out", str(tmp_path)])  # fmt: skip
    assert got["same"] and got["val_engram"] > 0 and got["val_plain"] > 0
