#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Debian's Abseil does not ship these; same meaning as in Abseil's internal code.
#define METERD_CONCAT_INNER(a, b) a##b
#define METERD_CONCAT(a, b) METERD_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                        \
  do {                                               \
    ::absl::Status meterd_status_ = (expr);          \
    if (!meterd_status_.ok()) return meterd_status_; \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(METERD_CONCAT(meterd_statusor_, __LINE__), lhs, expr)

#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()
