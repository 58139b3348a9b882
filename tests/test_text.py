"""T5 through transformers: FP16 keeps the overflow-prone projection in FP32 and stays finite."""

import torch

from cogvideox import text


def test_fp16_t5_keeps_wo_in_fp32_and_stays_close_to_fp32(tiny_2b):
    tokenizer = text.load_tokenizer(tiny_2b / "tokenizer")
    ids = text.tokenize(tokenizer, ["a butterfly with stained glass wings", ""])
    assert ids.shape == (2, 226) and ids[1, 0] == tokenizer.eos_token_id and ids[1, 1:].eq(0).all()
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        encoder = text.load_text_encoder(tiny_2b / "text_encoder", dtype)
        with torch.no_grad():  # push the gated FF far past FP16's range (65504) before `wo`
            for block in encoder.encoder.block:
                block.layer[1].DenseReluDense.wi_0.weight.mul_(60)
                block.layer[1].DenseReluDense.wi_1.weight.mul_(60)
        outputs[dtype] = text.encode(encoder, ids)
    wo = encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and encoder.shared.weight.dtype == torch.float16
    half = outputs[torch.float16]
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), outputs[torch.float32], atol=0.05, rtol=0.05)
