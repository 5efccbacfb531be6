"""The ED recipe's published constants (reference code, see ``../shared/spec/method.md``).

Kept free of torch so that CLIs can show them in ``--help`` without importing torch.

* ``a_dyn = 0.25``: stage-2 extrapolation, ``ext = pre + a_dyn * (pre - ft)``;
* ``b_dyn = 0.75``: dynamics model ``pre + b_dyn * DARE_p(ext - pre)`` (expectation ``pre - 0.1875 tau``);
* ``a_con = 1.0``, ``b_con = 0.25``: control model ``a_con * ft + b_con * DARE_p(tau)``
  (expectation ``pre + 1.25 tau``);
* ``p = 0.7``: DARE drop rate.
"""

ED_DEFAULTS: dict[str, float] = {"a_dyn": 0.25, "b_dyn": 0.75, "a_con": 1.0, "b_con": 0.25, "p": 0.7}
