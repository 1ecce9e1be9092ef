// Build module for the pod sandbox ("pause") binary (hack/build-tools.sh).
// It has no dependencies beyond the standard library.
module waso.dev/hack/tools/pause

go 1.26.0
