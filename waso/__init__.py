"""waso: WhatsApp Session Operator."""
