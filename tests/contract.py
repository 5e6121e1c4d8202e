"""Compare an exported SDL with the public API contract: everything in the contract must exist."""

from __future__ import annotations

from graphql import (
    GraphQLArgument,
    GraphQLEnumType,
    GraphQLInputField,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    build_schema,
    print_ast,
)


def _default(arg: GraphQLArgument | GraphQLInputField) -> str | None:
    node = arg.ast_node
    value = getattr(node, "default_value", None) if node is not None else None
    printed = print_ast(value) if value is not None else None
    # A nullable input with default null means what one with no default means: null when omitted.
    return None if printed == "null" else printed


def missing_from(contract_sdl: str, schema_sdl: str) -> list[str]:
    contract: GraphQLSchema = build_schema(contract_sdl)
    actual: GraphQLSchema = build_schema(schema_sdl)
    problems: list[str] = []
    for name, ctype in contract.type_map.items():
        if name.startswith("__"):
            continue
        atype = actual.type_map.get(name)
        if atype is None:
            problems.append(f"type {name} is missing")
            continue
        if type(atype) is not type(ctype):
            problems.append(
                f"{name} is a {type(atype).__name__}, the contract says {type(ctype).__name__}"
            )
            continue
        if isinstance(ctype, GraphQLEnumType):
            assert isinstance(atype, GraphQLEnumType)
            for value in ctype.values:
                if value not in atype.values:
                    problems.append(f"enum value {name}.{value} is missing")
        elif isinstance(ctype, GraphQLObjectType | GraphQLInterfaceType):
            assert isinstance(atype, GraphQLObjectType | GraphQLInterfaceType)
            for iface in ctype.interfaces:
                if iface.name not in {i.name for i in atype.interfaces}:
                    problems.append(f"{name} does not implement {iface.name}")
            for fname, cfield in ctype.fields.items():
                afield = atype.fields.get(fname)
                if afield is None:
                    problems.append(f"field {name}.{fname} is missing")
                    continue
                if str(afield.type) != str(cfield.type):
                    problems.append(
                        f"field {name}.{fname} is {afield.type}, contract: {cfield.type}"
                    )
                for aname, carg in cfield.args.items():
                    aarg = afield.args.get(aname)
                    if aarg is None:
                        problems.append(f"argument {name}.{fname}({aname}) is missing")
                    elif str(aarg.type) != str(carg.type) or _default(aarg) != _default(carg):
                        problems.append(
                            f"argument {name}.{fname}({aname}) is {aarg.type} = {_default(aarg)},"
                            f" contract: {carg.type} = {_default(carg)}"
                        )
                for aname, aarg in afield.args.items():
                    if (
                        aname not in cfield.args
                        and str(aarg.type).endswith("!")
                        and _default(aarg) is None
                    ):
                        problems.append(f"argument {name}.{fname}({aname}) is new and required")
        elif isinstance(ctype, GraphQLInputObjectType):
            assert isinstance(atype, GraphQLInputObjectType)
            for fname, cfield in ctype.fields.items():
                afield = atype.fields.get(fname)
                if afield is None:
                    problems.append(f"input field {name}.{fname} is missing")
                elif str(afield.type) != str(cfield.type) or _default(afield) != _default(cfield):
                    problems.append(
                        f"input field {name}.{fname} is {afield.type} = {_default(afield)},"
                        f" contract: {cfield.type} = {_default(cfield)}"
                    )
        elif isinstance(ctype, GraphQLScalarType):
            pass
    return problems
