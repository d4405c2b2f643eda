"""The parts of one contender, composed by :class:`kubelock.election.Elector`.

* :mod:`.view`: what the contender last saw of the lock and when it expires
  (pure, no I/O).
* :mod:`.feed`: the watch on the lock object, reopened when it drops.
* :mod:`.pacer`: the queue and the hand-off window: when a waiter may write.
* :mod:`.attempts`: one acquisition attempt after another: read, decide, and
  the conditional write, including writes whose answers were lost.
* :mod:`.tenure`: holding an acquired lock: its deadlines and fencing token,
  releasing, and :meth:`~.tenure.Tenure.holding` around the work.
* :mod:`.renewal`: renewing it, and deciding when it is lost.

The safety model is stated once, in :mod:`kubelock.election`.
"""
