"""The service layer: every operation of the API contract once, whatever door calls it.

`InferenceService` (synchronous and streamed inference, warm-up) and `RegistryService` (the
catalog and the models' lifecycle). REST handlers, gRPC servicers and CLI commands translate
to and from these calls and do nothing else, so behaviour cannot differ between doors.
"""
