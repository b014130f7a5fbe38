"""Server reflection under both of its names: ``grpc.reflection.v1`` (what current grpcurl and ghz
ask first) and the older ``grpc.reflection.v1alpha``.

grpcio-reflection ships the v1alpha protocol only. v1 is the same messages, field for field, in
package ``grpc.reflection.v1``, so one servicer answers both names with the same wire encoding;
v1's file descriptor, derived from v1alpha's, is added to the default descriptor pool so that
reflection describes the v1 service too (``grpcurl describe grpc.reflection.v1.ServerReflection``).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

from latentsearch.server.malformed import HandlerRegistry

__all__ = ["REFLECTION_SERVICES", "V1ALPHA_SERVICE", "V1_SERVICE", "enable_reflection", "v1_file"]

V1ALPHA_SERVICE: str = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
REFLECTION_SERVICES = (V1_SERVICE, V1ALPHA_SERVICE)

_V1_FILE = "grpc/reflection/v1/reflection.proto"  # its name upstream (grpc/grpc-proto)
_V1ALPHA_PACKAGE = reflection_pb2.DESCRIPTOR.package
_V1_PACKAGE = "grpc.reflection.v1"


def enable_reflection(service_names: Iterable[str], server: HandlerRegistry) -> None:
    """Serve reflection of ``service_names`` and of both reflection services on ``server``
    (a ``grpc.aio.Server``, or a registry standing in for one)."""
    v1_file()
    servicer = reflection.aio.ReflectionServicer((*service_names, *REFLECTION_SERVICES))
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for service in REFLECTION_SERVICES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def v1_file() -> FileDescriptor:
    """The ``grpc/reflection/v1/reflection.proto`` descriptor in the default pool (added on first call)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(_V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    proto.name, proto.package = _V1_FILE, _V1_PACKAGE
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.ClearField("deprecated")  # v1alpha is deprecated; v1 is its successor
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # message-typed fields only (assigning "" would mark it set)
                field.type_name = _in_v1(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = _in_v1(method.input_type), _in_v1(method.output_type)
    return pool.AddSerializedFile(proto.SerializeToString())


def _in_v1(type_name: str) -> str:
    """A fully qualified v1alpha type name (".grpc.reflection.v1alpha.X") moved to the v1 package."""
    prefix = f".{_V1ALPHA_PACKAGE}."
    return f".{_V1_PACKAGE}.{type_name[len(prefix):]}" if type_name.startswith(prefix) else type_name
