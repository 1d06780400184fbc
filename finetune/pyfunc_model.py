"""The MLflow models-from-code entry of a Celler pyfunc model (logged by ``finetune/export.py``).

MLflow copies this file into the logged model and runs it at load, in place of unpickling a
``python_model.pkl``: a load reads this text, the MLmodel file and the bundle artifact
(safetensors + JSON, checked against its checksums in ``CellerPyfunc.load_context``), no pickle.
It imports only the installed ``finetune`` package, so it runs wherever HiCeller is installed.
"""

import mlflow.models

from finetune.pyfunc import CellerPyfunc

# set_model at import is MLflow's contract for models-from-code; the instance holds nothing until
# load_context reads the bundle.
mlflow.models.set_model(CellerPyfunc())
