"""robust-infl: training-data influence on utility, robustness and fairness objectives.

``influence(model, train, target, objective=..., method="ip")`` returns one harm score per training
sample (positive = removing it is predicted to DECREASE the objective); ``model`` may be an
``Ensemble`` of trained models (scores averaged over them). See ``robust_infl.api``.
"""

from robust_infl.api import influence
from robust_infl.ensembles import Ensemble
from robust_infl.methods import available_methods, register_method
from robust_infl.objectives import DemographicParity, EqualOpportunity, Objective, Robust, Utility
from robust_infl.options import ScoringOptions

__all__ = [
    "influence",
    "Ensemble",
    "ScoringOptions",
    "Objective",
    "Utility",
    "Robust",
    "DemographicParity",
    "EqualOpportunity",
    "register_method",
    "available_methods",
]

__version__ = "0.1.0"
