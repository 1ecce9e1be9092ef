"""The waso.dev/v1alpha1 API: pydantic models of the CRDs, condition helpers. No I/O."""
