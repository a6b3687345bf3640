"""Whole-slide prediction: a spot grid over tissue, patches encoded as the model's training features
were, predictions streamed to a resumable file and written as a scverse AnnData."""

from he2st.predict.config import PredictConfig
from he2st.predict.slide import ChunkInfo, run_prediction

__all__ = ["ChunkInfo", "PredictConfig", "run_prediction"]
