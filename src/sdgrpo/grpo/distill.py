"""The teacher's per-token signal in the policy loss: token advantages (``--advantage token``) and the top-K
distillation term (``--distill_topk``), both from what the reward's scoring pass kept for this batch."""

from __future__ import annotations

import torch


class TokenDistillMixin:
    """Shadows the end of TRL 1.15's ``_generate_and_score_completions`` (:meth:`_use_token_advantages`,
    :meth:`_attach_teacher_topk`, called by ``SelfDistillMixin``), its ``_get_per_token_logps_and_entropies`` in the
    loss's pass under ``--distill_topk`` (:meth:`_logps_with_topk`) and, in ``_compute_loss``, the term added to
    TRL's loss (:meth:`_topk_term`); ``SelfDistillMixin`` dispatches both.

    Guarantees: under ``--advantage token`` the batch's ``advantages`` are (B, T), each token's teacher - policy
    log-prob (plus ``sequence_advantage_weight`` times TRL's sequence advantage), 0 past each completion; under
    ``--distill_topk`` the batch carries the teacher's top-K (``teacher_topk_logps``, ``teacher_topk_ids``, (B, T, K))
    and the loss's policy pass is TRL's own, returning the same values, with the policy's log-probs at those ids as a
    by-product (``_student_topk_logps``). Either raises where the reward kept nothing for the batch. Reads
    ``reward_funcs``, ``_student_topk`` (set by ``SelfDistillMixin._compute_loss`` for its policy pass).
    """

    def _use_token_advantages(self, output: dict) -> None:
        """Replace TRL's (B,) advantages by (B, T): each completion token's teacher - policy log-prob, as the reward
        computed it for this process's rows (detached), plus ``sequence_advantage_weight`` times TRL's
        group-normalised sequence advantage; 0 past each completion. TRL 1.15's loss reads (B, T) advantages
        (``_compute_loss`` unsqueezes only a 1-D tensor; pinned in tests/test_private_api.py)."""
        terms = getattr(self.reward_funcs[0], "token_terms", None)
        mask = output["completion_mask"]
        if terms is None or len(terms) != mask.size(0):
            raise RuntimeError("--advantage token: the reward kept no per-token terms for this batch")
        advantages = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for row, term in enumerate(terms):
            n = min(term.numel(), mask.size(1))
            advantages[row, :n] = term[:n].to(advantages.device, torch.float32)
        weight = float(getattr(self.args, "sequence_advantage_weight", 0.0))
        if weight:
            advantages = advantages + weight * output["advantages"].float().reshape(-1, 1)
        output["advantages"] = advantages * mask
        mode = "train" if self.model.training else "eval"
        count = mask.sum().clamp(min=1)
        self._metrics[mode]["advantage/token_mean"].append(
            self.accelerator.gather((advantages * mask).sum() / count).mean().item())

    def _attach_teacher_topk(self, output: dict) -> None:
        """The teacher's top-K log-probs and ids at every completion position of this process's rows, as the
        reward's scoring pass kept them, into ``output`` as (B, T, K) tensors (``teacher_topk_logps``,
        ``teacher_topk_ids``; TRL splits and shuffles them with the batch); 0 past each completion."""
        tops = getattr(self.reward_funcs[0], "token_topk", None)
        mask = output["completion_mask"]
        if tops is None or len(tops) != mask.size(0):
            raise RuntimeError("--distill_topk: the reward kept no top-k teacher log-probs for this batch")
        k = max(v.size(1) for v, _ in tops)  # K, or the vocabulary where that is smaller
        logps = torch.zeros(*mask.shape, k, dtype=torch.float32, device=mask.device)
        ids = torch.zeros(*mask.shape, k, dtype=torch.long, device=mask.device)
        for row, (values, index) in enumerate(tops):
            n = min(values.size(0), mask.size(1))
            logps[row, :n] = values[:n].to(logps.device)
            ids[row, :n] = index[:n].to(ids.device)
        output["teacher_topk_logps"], output["teacher_topk_ids"] = logps, ids

    def _logps_with_topk(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs):
        """The loss's policy pass under --distill_topk: TRL 1.15's own ``_get_per_token_logps_and_entropies`` (its
        fused LM head: log-probs of the completion tokens and entropies at TRL's temperature, in chunks of
        ``batch_size`` rows), whose head operands are routed (``compat.fused_head_route``) to
        ``chunked.token_stats``, which also gives the policy's log-probs at temperature 1 at the teacher's top-K ids
        (``self._student_topk_logps``, (B, T, K); 0 where TRL's head scores no label: padding, masked rows). Token
        chunk by token chunk, forward and backward: no (rows, tokens, vocabulary) logits (TRL's kernel returns no
        logits, and liger-kernel's GRPO loss no per-token values: sdgrpo.chunked says why neither fits)."""
        from sdgrpo.chunked import token_stats
        from sdgrpo.compat import fused_head_route

        topk = self._student_topk  # (B, T, K)
        batch_size = batch_size or input_ids.size(0)
        # The labels TRL's pass builds (pinned in tests/test_private_api.py): completion tokens the mask attends.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        calls = []  # per model call of TRL's loop: (labelled positions (b, T - 1), their labels, their top-K ids)
        for start in range(0, input_ids.size(0), batch_size):
            shifted = labels[start : start + batch_size, 1:]
            ids = topk.new_zeros(*shifted.shape, topk.size(-1))
            ids[:, -logits_to_keep:] = topk[start : start + batch_size]
            mask = shifted != -100
            calls.append((mask, shifted[mask], ids[mask]))
        pending, tops = iter(calls), []

        def head(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                 outputs=("entropy",)):
            mask, expected, ids = next(pending, (None, None, None))
            if mask is None or not torch.equal(targets, expected.to(targets.device)):
                raise RuntimeError("--distill_topk: TRL's fused head scored other tokens than its labels of this "
                                   "pass (has TRL's _get_per_token_logps_and_entropies changed?)")
            *stats, at_ids = token_stats(hidden, weight, bias, targets, temperature, logit_scale, softcap, outputs,
                                         topk_ids=ids.to(targets.device))
            tops.append(at_ids.new_zeros(*mask.shape, ids.size(-1)).masked_scatter(mask[..., None].to(at_ids.device),
                                                                                   at_ids))
            return tuple(stats)

        with fused_head_route(head):
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             batch_size, *args, **kwargs)
        if len(tops) != len(calls):
            raise RuntimeError("--distill_topk: TRL's pass made another number of fused-head calls than expected")
        self._student_topk_logps = torch.cat(tops)[:, -logits_to_keep:]
        return out

    def _topk_term(self, inputs) -> torch.Tensor:
        """KL(policy || teacher) on the teacher's top-K tokens plus one bucket for the rest of the vocabulary (TRL's
        ``add_tail_bucket`` and ``compute_divergence`` with alpha 1, as its SDPO distills a teacher server's top-K),
        summed over this micro-batch's completion tokens and divided as TRL 1.15's ``_compute_loss`` divides its
        dapo loss: by the completion tokens of one accumulation window on one process (``num_items_in_batch``, the
        generation batch's over all processes, / processes x accumulation steps / steps per generation; in eval the
        batch is not split). TRL's loss is already scaled for accumulation (``loss_is_scaled_for_ga``: the Trainer
        divides nothing), so a step's micro-batches add up to the mean over the step's tokens, whatever the
        accumulation; logged (``distill/topk_kl``) is the micro-batch's mean."""
        from trl.experimental.sdpo.loss_utils import add_tail_bucket, compute_divergence

        student = add_tail_bucket(self._student_topk_logps)
        teacher = add_tail_bucket(inputs["teacher_topk_logps"].to(student.dtype))
        kl = compute_divergence(student, teacher, 1.0)  # (B, T)
        mask = inputs["completion_mask"].to(kl.dtype)
        total = (kl * mask).sum()
        mode = "train" if self.model.training else "eval"
        mean = total.detach() / mask.sum().clamp(min=1)
        self._metrics[mode]["distill/topk_kl"].append(self.accelerator.gather(mean).mean().item())
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return total / normaliser
