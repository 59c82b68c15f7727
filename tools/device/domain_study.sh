#!/usr/bin/env bash
# GPU machine, one call: studies/domain_study.py on the shipped model, every arm up to STEPS optimizer steps (or
# ARM_SECONDS, whichever first), JOBS arms at once in their own processes. Carry .whl and .device_pack
# (corpus.tar.xz: ../shared/data's tinyshakespeare, gutenberg, gutenberg-more and wikitext-2 folders). To $OUT:
# domain_study.json, domain_study.png, study.log. The sampler's quality gate: ARMS=base,sft,distill_token,distill_sampler
# SEED_ARMS=distill_token,distill_sampler SFT_LRS=1e-4 TEACHER_LRS=1e-4 STEPS=600 (SAMPLERS: which). STUDY_ARGS: more
# options of domain_study.py, after these (a later one wins: replay_study.sh sets its arms so).
# A study split over two calls: KEEP=sft@1e-3,sft@1e-4 also packs those arms' adapters into $OUT/adapters.tar;
# RESUME=DIR (a carried folder holding the first call's domain_study.json and adapters.tar) starts from them: the
# arms already in the JSON are not run again, and the distill arms find their teachers.
set -u
source tools/device/env.sh
export STUDY_WORK=/tmp/study_work
mkdir -p "$STUDY_WORK"
if [ -n "${RESUME:-}" ]; then
  cp "$RESUME/domain_study.json" "$OUT/" && tar xf "$RESUME/adapters.tar" -C "$STUDY_WORK" || exit 1
fi
python3 studies/split_articles.py .device_data/wikitext-2/valid.txt /tmp/wiki_train.txt /tmp/wiki_heldout.txt
timeout "${STUDY_SECONDS:-560}" python3 studies/domain_study.py \
  --domain_train /tmp/wiki_train.txt --domain_heldout /tmp/wiki_heldout.txt --out "$OUT" --general_data .device_data \
  --steps "${STEPS:-1000}" --budget_s "${ARM_SECONDS:-330}" --jobs "${JOBS:-13}" \
  --arms "${ARMS:-base,sft,context_distill,context_distill_token,distill,distill_token}" \
  --sft_lrs "${SFT_LRS:-1e-4,3e-4,1e-3,3e-3}" --seeds 0,1,2 --seed_arms "${SEED_ARMS:-distill,distill_token}" \
  --teacher_lr "${TEACHER_LRS:-1e-3}" --samplers "${SAMPLERS:-generate,int4,spg2,spg4}" ${STUDY_ARGS:-} \
  > "$OUT/study.log" 2>&1
echo "study exit $?"
if [ -n "${KEEP:-}" ]; then
  (cd "$STUDY_WORK" && tar cf "$OUT/adapters.tar" --exclude='checkpoint-*' --exclude='*.pt' \
    $(echo "$KEEP" | tr ',' ' '))
fi
grep -v "^== " "$OUT/study.log" | tail -40
