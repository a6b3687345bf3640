"""Methods behind one interface (:class:`~he2st.methods.base.Method`): BLEEP and the baselines."""

from he2st.methods.base import Method, Prediction, TrainLog, load_method
from he2st.methods.registry import create_method, list_methods

__all__ = ["Method", "Prediction", "TrainLog", "create_method", "list_methods", "load_method"]
