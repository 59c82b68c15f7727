#!/usr/bin/env bash
# GPU machine, one call: the forgetting arms of studies/domain_study.py on the shipped model, every arm
# STEPS optimizer steps (600; or ARM_SECONDS, whichever first), JOBS arms at once in their own processes: the base;
# sft@1e-4 with its checkpoint every TRAJECTORY_EVERY steps measured (SFT stopped early: the frontier); and for 3
# seeds sft_kl@0.5 (KL-to-base penalty on the domain rows), sft_replay@0.25/0.5 (self-replay), distill<-sft@token
# (on-policy distillation from sft@1e-4, share 0) and distill_replay@0.25/0.5 (the same with self-replay). Each arm:
# domain and general held-out bits per byte, and KL(trained || base) on the general held-out text. Carry .whl and
# .device_pack (see README.md). To $OUT: domain_study.json, domain_study.png, study.log.
# Over two calls, as domain_study.sh: KEEP=sft@1e-4 packs that arm's adapter into $OUT/adapters.tar; RESUME=DIR (a
# carried folder holding the first call's domain_study.json and adapters.tar) runs only the arms not yet in it.
set -u
source tools/device/env.sh
export STUDY_WORK=/tmp/study_work
mkdir -p "$STUDY_WORK"
if [ -n "${RESUME:-}" ]; then
  cp "$RESUME/domain_study.json" "$OUT/" && tar xf "$RESUME/adapters.tar" -C "$STUDY_WORK" || exit 1
fi
python3 studies/split_articles.py .device_data/wikitext-2/valid.txt /tmp/wiki_train.txt /tmp/wiki_heldout.txt
timeout "${STUDY_SECONDS:-570}" python3 studies/domain_study.py \
  --domain_train /tmp/wiki_train.txt --domain_heldout /tmp/wiki_heldout.txt --out "$OUT" --general_data .device_data \
  --steps "${STEPS:-600}" --budget_s "${ARM_SECONDS:-400}" --jobs "${JOBS:-20}" \
  --arms "${ARMS:-base,sft,sft_kl,sft_replay,distill_token,distill_replay}" --sft_lrs 1e-4 --teacher_lr 1e-4 \
  --trajectory "1e-4:${TRAJECTORY_EVERY:-100}" --replay_lr 1e-4 --kl_weights "${KL_WEIGHTS:-0.5}" \
  --replay_shares "${REPLAY_SHARES:-0.25,0.5}" --replay_samples "${REPLAY_SAMPLES:-512}" \
  --seeds 0,1,2 --seed_arms "${SEED_ARMS:-sft_kl,sft_replay,distill_token,distill_replay}" > "$OUT/study.log" 2>&1
echo "study exit $?"
if [ -n "${KEEP:-}" ]; then
  (cd "$STUDY_WORK" && tar cf "$OUT/adapters.tar" --exclude='checkpoint-*' --exclude='*.pt' \
    $(echo "$KEEP" | tr ',' ' '))
fi
grep -v "^== " "$OUT/study.log" | tail -40
