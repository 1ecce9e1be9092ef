"""WhatsApp sandbox for staging and tests: QR and pairing-code linking, messages, faults."""
