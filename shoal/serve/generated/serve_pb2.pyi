from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ListApplicationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApplicationsResponse(_message.Message):
    __slots__ = ("application_names",)
    APPLICATION_NAMES_FIELD_NUMBER: _ClassVar[int]
    application_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, application_names: _Optional[_Iterable[str]] = ...) -> None: ...

class HealthzRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthzResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class UserDefinedMessage(_message.Message):
    __slots__ = ("name", "foo", "num")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FOO_FIELD_NUMBER: _ClassVar[int]
    NUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    foo: str
    num: int
    def __init__(self, name: _Optional[str] = ..., foo: _Optional[str] = ..., num: _Optional[int] = ...) -> None: ...

class UserDefinedResponse(_message.Message):
    __slots__ = ("greeting", "num_x2")
    GREETING_FIELD_NUMBER: _ClassVar[int]
    NUM_X2_FIELD_NUMBER: _ClassVar[int]
    greeting: str
    num_x2: int
    def __init__(self, greeting: _Optional[str] = ..., num_x2: _Optional[int] = ...) -> None: ...

class UserDefinedMessage2(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserDefinedResponse2(_message.Message):
    __slots__ = ("greeting",)
    GREETING_FIELD_NUMBER: _ClassVar[int]
    greeting: str
    def __init__(self, greeting: _Optional[str] = ...) -> None: ...

class FruitAmounts(_message.Message):
    __slots__ = ("orange", "apple", "banana")
    ORANGE_FIELD_NUMBER: _ClassVar[int]
    APPLE_FIELD_NUMBER: _ClassVar[int]
    BANANA_FIELD_NUMBER: _ClassVar[int]
    orange: int
    apple: int
    banana: int
    def __init__(self, orange: _Optional[int] = ..., apple: _Optional[int] = ..., banana: _Optional[int] = ...) -> None: ...

class FruitCosts(_message.Message):
    __slots__ = ("costs",)
    COSTS_FIELD_NUMBER: _ClassVar[int]
    costs: float
    def __init__(self, costs: _Optional[float] = ...) -> None: ...

class ArrayData(_message.Message):
    __slots__ = ("nums",)
    NUMS_FIELD_NUMBER: _ClassVar[int]
    nums: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, nums: _Optional[_Iterable[float]] = ...) -> None: ...

class StringData(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: str
    def __init__(self, data: _Optional[str] = ...) -> None: ...

class ModelOutput(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: float
    def __init__(self, output: _Optional[float] = ...) -> None: ...
