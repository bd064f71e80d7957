# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Exceptions of the stiefel library.

Every parser in the library raises one of these and nothing else for bad
input, so the daemons can catch ``ProtocolError``, log the reason and keep
serving, and the modules can turn ``StiefelError`` into a clear failure.
"""

from __future__ import annotations


class StiefelError(Exception):
    """Base class of every error the library raises on purpose."""


class KeyFileError(StiefelError):
    """A stiefel key file is missing, unreadable or not in the v1 format."""


class ProtocolError(StiefelError):
    """Input from the network (or a file) that must not be acted on."""


class MalformedMessage(ProtocolError):
    """The bytes are not a message of the expected layout."""


class TruncatedMessage(ProtocolError):
    """The input ended before the message or stream was complete."""


class OversizedMessage(ProtocolError):
    """A length is beyond the protocol's limits; nothing was buffered."""


class UnsupportedVersion(ProtocolError):
    """The message names a protocol version this library does not speak."""


class WrongKey(ProtocolError):
    """The message was made with another stiefel key (its key id differs)."""


class AuthenticationFailed(ProtocolError):
    """The MAC or AEAD tag does not verify: forged, corrupted or reordered."""


class ReplayedMessage(ProtocolError):
    """The message was seen before, or answers a challenge that is gone."""


class PayloadVerificationFailed(ProtocolError):
    """The decrypted payload does not match its authenticated manifest."""


class ServerError(StiefelError):
    """The server cannot serve (no /boot content, no disk, ...)."""


class RamdiskBuildError(StiefelError):
    """A ramdisk build stage cannot run or failed; the message says why and where the log is."""


class NbdExportError(StiefelError):
    """Invalid export settings, or the export cannot be served as asked."""


class DeviceInUse(NbdExportError):
    """The device (or a partition / holder of it) is mounted or used on this host."""
