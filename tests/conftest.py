import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when tests run model code.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_2b(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-2b"), style="2b")


@pytest.fixture(scope="session")
def tiny_5b(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-5b"), style="5b", scheduler="CogVideoXDPMScheduler"
    )


@pytest.fixture(scope="session")
def tiny_15(tmp_path_factory):
    """CogVideoX 1.5's layout (temporal patches, sliced RoPE, padded latent frames), shared by its tests."""
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-15"), style="1.5")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A ~15k-parameter random Llama with a byte-level BPE tokenizer trained here, saved like a Hub model: the
    prompt enhancer's local backend (tests/test_enhance.py, and on ZeroGPU tests/test_zerogpu.py)."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cogvideox import enhance

    prompts = json.loads((Path(__file__).parents[1] / "examples" / "prompts.json").read_text())
    folder = tmp_path_factory.mktemp("tiny-chat")
    specials = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [p["prompt"] for p in prompts if not p.get("short")]
    bpe.train_from_iterator([*corpus, enhance.SYSTEM_PROMPT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|eos|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Zero logits for special and blank tokens: random positive ones win greedy decoding, so text comes out.
    blank = [
        i
        for i in range(len(tokenizer))
        if not tokenizer.decode([i]).strip() or i in tokenizer.all_special_ids
    ]
    with torch.no_grad():
        model.lm_head.weight[blank] = 0
    model.save_pretrained(folder)
    return folder
