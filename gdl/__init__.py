"""gdl: an asynchronous, rate-limited download service.

Jobs arrive over HTTP (:mod:`gdl.api`), wait in Redis (:mod:`gdl.store`), are
claimed per aggregation by the scanner (:mod:`gdl.scanner`), downloaded by a
gevent pool per aggregation (:mod:`gdl.pool`, :mod:`gdl.download`), stored
(:mod:`gdl.filestorage`), announced by callback (:mod:`gdl.notifier`) and
finally deleted (:mod:`gdl.reaper`).
"""

__version__ = "0.1.0"
