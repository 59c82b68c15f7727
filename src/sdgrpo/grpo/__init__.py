"""sdgrpo's hooks into TRL's GRPOTrainer, one mixin per concern, composed by ``grpo_trainer.SelfDistillMixin``."""
