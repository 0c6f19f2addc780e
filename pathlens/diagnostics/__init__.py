"""Diagnostics: what single components write towards the answer — direct logit attribution per head
(`head_logit_attribution`) along the answer − wrong unembedding direction (`logit_direction`)."""

from pathlens.diagnostics.dla import frozen_final_norm, head_logit_attribution, logit_direction

__all__ = ["frozen_final_norm", "head_logit_attribution", "logit_direction"]
