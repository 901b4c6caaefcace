"""The Pylontech low-voltage RS-485 protocol (US2000/US3000/US5000, Force L): frames, INFO payloads,
the serial line they travel on, and their translation into telemetry.

Not Modbus: ASCII frames ``~`` + hex + checksum + ``\\r`` (see :mod:`rack_agent.pylontech.codec`).
"""
