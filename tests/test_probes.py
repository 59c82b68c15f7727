"""In-context copying probes: exact by hand on a stand-in copier, and above target on the shipped model."""

from __future__ import annotations

import pytest
import torch


def test_the_shipped_model_copies_from_its_context(shipped, corpus):
    """Induction score and context gain on text it never trained on, above the targets the recipe was chosen for."""
    from sdgrpo.probes import context_gain, induction_score

    model, tok = shipped
    texts = [p.read_text(encoding="utf-8-sig") for p in sorted(corpus.glob("*.txt"))]
    assert induction_score(model, tok, texts, 60, count=12) >= 2.0
    assert context_gain(model, tok, texts, count=12) >= 1.0


def test_induction_score_by_hand(tiny_tokenizer, corpus):
    """A stand-in that copies the token L places back (uniform where there is none) knows the second copy exactly and
    nothing of the first: its score is log V, to the digit, only if the probe scores exactly the two copies."""
    import math

    from sdgrpo.probes import induction_score

    vocab, length = len(tiny_tokenizer), 20

    class Copier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=0):  # a causal LM's face
            b, t = input_ids.shape
            logits = torch.zeros(b, t, vocab)
            for i in range(t):  # position i predicts token i + 1
                if i + 1 - length >= 1:
                    logits[torch.arange(b), i, input_ids[:, i + 1 - length]] = 60.0
            return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()

    score = induction_score(Copier(), tiny_tokenizer, [(corpus / "jonah.txt").read_text()], length, count=3)
    assert score == pytest.approx(math.log(vocab), abs=1e-4)
