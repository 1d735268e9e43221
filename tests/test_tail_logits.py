"""The learner computes logits only from the last prompt position on: same log-probs where loss is taken."""

from __future__ import annotations

import torch

from innerloop.learners.forward import first_predicting_position, left_pad, tail_logprobs
from innerloop.learners.logprobs import entropy_from_logits, token_logprobs


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


class _Batch:
    def __init__(self, prompt_lengths, completion_lengths):
        width = max(p + c for p, c in zip(prompt_lengths, completion_lengths))
        self.input_ids = torch.randint(1, 97, (len(prompt_lengths), width))
        self.attention_mask = torch.zeros_like(self.input_ids)
        self.loss_mask = torch.zeros(self.input_ids.shape)
        for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
            self.attention_mask[row, : p + c] = 1
            self.loss_mask[row, p : p + c] = 1


def test_first_predicting_position_is_the_shortest_prompts_last_token():
    assert first_predicting_position(_Batch([5, 3, 7], [2, 4, 1]).loss_mask) == 2
    assert first_predicting_position(torch.zeros(2, 6)) == 0  # no loss tokens: keep everything
    assert torch.equal(left_pad(torch.ones(2, 3), 2), torch.tensor([[0, 0, 1, 1, 1.0]] * 2))


def test_tail_logits_give_the_full_forwards_logprobs_and_entropy_where_loss_is_taken():
    model, batch = _tiny_llama(), _Batch([6, 4, 9], [5, 7, 2])
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        tail, got, start = tail_logprobs(model, batch, temperature=0.7)
    assert start == first_predicting_position(batch.loss_mask)
    assert tail.shape[1] == batch.input_ids.shape[1] - start < full.shape[1]
    mask = batch.loss_mask.bool()
    expected = token_logprobs(full, batch.input_ids, temperature=0.7)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert not got[:, : start + 1].any()  # nothing before the first predicted token
    expected_h = entropy_from_logits(full, temperature=0.7)
    got_h = left_pad(entropy_from_logits(tail, temperature=0.7), start)
    torch.testing.assert_close(got_h[mask], expected_h[mask], atol=1e-5, rtol=0)
