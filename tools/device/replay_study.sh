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
# domain_study.sh with these arms' defaults and options.
set -u
STEPS=${STEPS:-600} ARM_SECONDS=${ARM_SECONDS:-400} JOBS=${JOBS:-20} STUDY_SECONDS=${STUDY_SECONDS:-570} \
  ARMS=${ARMS:-base,sft,sft_kl,sft_replay,distill_token,distill_replay} SFT_LRS=1e-4 TEACHER_LRS=1e-4 \
  SEED_ARMS=${SEED_ARMS:-sft_kl,sft_replay,distill_token,distill_replay} \
  STUDY_ARGS="--trajectory 1e-4:${TRAJECTORY_EVERY:-100} --replay_lr 1e-4 --kl_weights ${KL_WEIGHTS:-0.5} \
--replay_shares ${REPLAY_SHARES:-0.25,0.5} --replay_samples ${REPLAY_SAMPLES:-512}" \
  exec bash tools/device/domain_study.sh
