"""The one orjson setting of every JSON body the server writes (responses, job results, SSE).

numpy arrays are serialised without a copy, and integer keys are allowed; one constant so the
REST fast path, the job store and the gRPC conversion can never encode the same result in
two ways.
"""

from __future__ import annotations

import orjson

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
