#include "lib/event/event_parser.h"

#include <cctype>
#include <cstring>

#include <simdjson.h>

namespace meterd::event {
namespace {

namespace od = simdjson::ondemand;

struct Refusal {
  RejectReason reason;
  std::string_view detail;
};

bool Digits(std::string_view text, size_t pos, size_t count, int* out) {
  if (pos + count > text.size()) return false;
  int value = 0;
  for (size_t i = pos; i < pos + count; ++i) {
    if (text[i] < '0' || text[i] > '9') return false;
    value = value * 10 + (text[i] - '0');
  }
  *out = value;
  return true;
}

// True when nothing but whitespace follows the value just iterated.
bool AtEnd(od::document& doc) {
  const char* location = nullptr;
  return doc.current_location().get(location) == simdjson::OUT_OF_BOUNDS;
}

bool IsLeap(int year) { return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0; }

int DaysInMonth(int year, int month) {
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  return month == 2 && IsLeap(year) ? 29 : kDays[month - 1];
}

// The attributes meterd reads. Keys are matched on their raw bytes (CloudEvents attribute
// names never need escaping); reading past a short key is safe inside simdjson's padding.
enum class Attribute { kOther, kSpecVersion, kId, kSource, kType, kSubject, kTime, kData };

Attribute Classify(const char* raw) {
  auto is = [raw](const char* quoted, size_t n) { return std::memcmp(raw, quoted, n) == 0; };
  switch (raw[0]) {
    case 's':
      if (is("specversion\"", 12)) return Attribute::kSpecVersion;
      if (is("source\"", 7)) return Attribute::kSource;
      if (is("subject\"", 8)) return Attribute::kSubject;
      return Attribute::kOther;
    case 'i':
      return is("id\"", 3) ? Attribute::kId : Attribute::kOther;
    case 't':
      if (is("type\"", 5)) return Attribute::kType;
      if (is("time\"", 5)) return Attribute::kTime;
      return Attribute::kOther;
    case 'd':
      return is("data\"", 5) ? Attribute::kData : Attribute::kOther;
    default:
      return Attribute::kOther;
  }
}

// Reads a string value. Fast path: the raw token when it has no escapes (all real producers'
// UUIDs, meter names, industry codes and timestamps), with no copy; otherwise simdjson unescapes.
bool ReadString(od::value value, std::string_view* out) {
  std::string_view token = value.raw_json_token();
  while (!token.empty() && (token.back() == ' ' || token.back() == '\n' || token.back() == '\r' ||
                            token.back() == '\t')) {
    token.remove_suffix(1);
  }
  if (token.size() >= 2 && token.front() == '"' && token.back() == '"') {
    bool escaped = false;
    for (size_t i = 1; i + 1 < token.size(); ++i) escaped |= token[i] == '\\';
    if (!escaped) {
      *out = token.substr(1, token.size() - 2);
      return true;
    }
  }
  return value.get_string().get(*out) == simdjson::SUCCESS;
}

// Reads a string value as its raw JSON text, escapes and all, without scanning it: for
// attributes meterd only carries (id, source), never interprets.
bool ReadRawString(od::value value, std::string_view* out) {
  std::string_view token = value.raw_json_token();
  if (token.empty() || token.front() != '"') return false;
  const size_t close = token.rfind('"');
  if (close == 0) return false;
  *out = token.substr(1, close - 1);
  return true;
}

using StringReader = bool (*)(od::value, std::string_view*);

// Batch mode is recognised by the first non-space byte, before handing the bytes to simdjson.
bool StartsArray(std::string_view bytes) {
  size_t first = 0;
  while (first < bytes.size() && std::isspace(static_cast<unsigned char>(bytes[first]))) ++first;
  return first < bytes.size() && bytes[first] == '[';
}

std::optional<int64_t> ParseQuantity(od::value value, Refusal* refusal) {
  int64_t quantity = 0;
  if (value.get_int64().get(quantity) != simdjson::SUCCESS) {
    *refusal = {RejectReason::kBadQuantity, "data.quantity must be a non-negative integer"};
    return std::nullopt;
  }
  // The upper bound is the meter's (checked once the meter is known): quantity_too_large.
  if (quantity < 0) {
    *refusal = {RejectReason::kBadQuantity, "data.quantity must be a non-negative integer"};
    return std::nullopt;
  }
  return quantity;
}

// Reads the "data" object: quantity (default 1) and industry (required).
bool ParseData(od::value value, UsageEvent* event, Refusal* refusal, StringReader read_string) {
  od::object data;
  if (value.get_object().get(data) != simdjson::SUCCESS) {
    *refusal = {RejectReason::kWrongType, "data must be an object"};
    return false;
  }
  bool have_industry = false, have_quantity = false;
  for (auto field : data) {
    od::raw_json_string key;
    if (field.key().get(key) != simdjson::SUCCESS) {
      *refusal = {RejectReason::kNotJson, "malformed key in data"};
      return false;
    }
    if ((key == "quantity" && have_quantity) || (key == "industry" && have_industry)) {
      *refusal = {RejectReason::kWrongType, "data field given twice"};
      return false;
    }
    if (key == "quantity") {
      have_quantity = true;
      auto quantity = ParseQuantity(field.value(), refusal);
      if (!quantity) return false;
      event->quantity = *quantity;
    } else if (key == "industry") {
      std::string_view code;
      if (!read_string(field.value(), &code)) {
        *refusal = {RejectReason::kWrongType, "data.industry must be a string"};
        return false;
      }
      auto industry = ParseIndustry(code);
      if (!industry) {
        *refusal = {RejectReason::kBadIndustry,
                    "data.industry must be one of hs, rest, auto, ret, edu, payroll"};
        return false;
      }
      event->industry = *industry;
      have_industry = true;
    }
  }
  if (!have_industry) {
    *refusal = {RejectReason::kMissingField, "data.industry"};
    return false;
  }
  return true;
}

}  // namespace

std::optional<int64_t> ParseRfc3339Micros(std::string_view text) {
  int year, month, day, hour, minute, second;
  if (text.size() < 20 || !Digits(text, 0, 4, &year) || text[4] != '-' ||
      !Digits(text, 5, 2, &month) || text[7] != '-' || !Digits(text, 8, 2, &day) ||
      (text[10] != 'T' && text[10] != 't' && text[10] != ' ') || !Digits(text, 11, 2, &hour) ||
      text[13] != ':' || !Digits(text, 14, 2, &minute) || text[16] != ':' ||
      !Digits(text, 17, 2, &second)) {
    return std::nullopt;
  }
  if (month < 1 || month > 12 || day < 1 || day > DaysInMonth(year, month) || hour > 23 ||
      minute > 59 || second > 60) {
    return std::nullopt;
  }
  size_t pos = 19;
  int64_t micros = 0;
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    int digits = 0;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
      if (digits < 6) micros = micros * 10 + (text[pos] - '0');
      ++digits;
      ++pos;
    }
    if (digits == 0) return std::nullopt;
    for (int i = digits; i < 6; ++i) micros *= 10;
  }
  int64_t offset_seconds = 0;
  if (pos == text.size()) return std::nullopt;
  if (text[pos] == 'Z' || text[pos] == 'z') {
    ++pos;
  } else if (text[pos] == '+' || text[pos] == '-') {
    int off_hour, off_minute;
    if (!Digits(text, pos + 1, 2, &off_hour) || pos + 3 >= text.size() || text[pos + 3] != ':' ||
        !Digits(text, pos + 4, 2, &off_minute) || off_hour > 23 || off_minute > 59) {
      return std::nullopt;
    }
    offset_seconds = (off_hour * 3600 + off_minute * 60) * (text[pos] == '+' ? 1 : -1);
    pos += 6;
  } else {
    return std::nullopt;
  }
  if (pos != text.size()) return std::nullopt;
  const int64_t days =
      DaysFromCivil(year, static_cast<unsigned>(month), static_cast<unsigned>(day));
  const int64_t seconds =
      days * 86400 + hour * 3600 + minute * 60 + std::min(second, 59) - offset_seconds;
  return seconds * 1'000'000 + micros;
}

// One parser for whole messages, one for batch elements (parsed while the batch is iterated).
struct EventParser::SimdParsers {
  od::parser message;
  od::parser element;
};

EventParser::EventParser(const MeterRegistry* meters, ParseLimits limits)
    : meters_(meters), limits_(limits), parsers_(std::make_unique<SimdParsers>()) {}

EventParser::~EventParser() = default;

std::string_view EventParser::CopyPadded(std::string_view bytes) {
  result_.events.clear();
  result_.rejections.clear();
  const size_t needed = bytes.size() + simdjson::SIMDJSON_PADDING;
  if (needed > buffer_capacity_) {
    buffer_capacity_ = std::max(needed, size_t{4096});
    buffer_ = std::make_unique<char[]>(buffer_capacity_);
  }
  std::memcpy(buffer_.get(), bytes.data(), bytes.size());
  std::memset(buffer_.get() + bytes.size(), 0, simdjson::SIMDJSON_PADDING);
  return std::string_view(buffer_.get(), bytes.size());
}

EventParser::Window EventParser::WindowAt(absl::Time now) const {
  return {absl::ToUnixMicros(now - limits_.late_window),
          absl::ToUnixMicros(now + limits_.max_future_skew)};
}

const ParsedMessage& EventParser::Parse(std::string_view bytes, absl::Time now) {
  const std::string_view padded = CopyPadded(bytes);
  const Window window = WindowAt(now);
  if (StartsArray(padded)) {
    ParseBatch(padded, window);
  } else {
    ParseOne(/*element=*/false, padded, buffer_capacity_, window);
  }
  return result_;
}

const ParsedMessage& EventParser::ParseElement(std::string_view bytes, absl::Time now) {
  const std::string_view padded = CopyPadded(bytes);
  if (StartsArray(padded)) {
    // What ParseBatch says of an element that is not an object.
    result_.rejections.push_back(
        {RejectReason::kNotObject, "batch element is not an object", padded});
  } else {
    ParseOne(/*element=*/false, padded, buffer_capacity_, WindowAt(now));
  }
  return result_;
}

void EventParser::ParseBatch(std::string_view padded_bytes, const Window& window) {
  od::document doc;
  od::array array;
  auto reject_all = [&](RejectReason reason, std::string_view detail) {
    result_.events.clear();
    result_.rejections.clear();
    result_.rejections.push_back({reason, detail, padded_bytes});
  };
  if (parsers_->message.iterate(padded_bytes.data(), padded_bytes.size(), buffer_capacity_)
              .get(doc) != simdjson::SUCCESS ||
      doc.get_array().get(array) != simdjson::SUCCESS) {
    return reject_all(RejectReason::kNotJson, "batch is not a JSON array");
  }
  size_t count = 0;
  for (auto element : array) {
    ++count;
    od::value value;
    if (element.get(value) != simdjson::SUCCESS) {
      return reject_all(RejectReason::kNotJson, "malformed batch array");
    }
    od::object object;
    if (value.get_object().get(object) != simdjson::SUCCESS) {
      std::string_view token = value.raw_json_token();
      result_.rejections.push_back(
          {RejectReason::kNotObject, "batch element is not an object", token});
      continue;
    }
    std::string_view raw;
    if (object.raw_json().get(raw) != simdjson::SUCCESS) {
      return reject_all(RejectReason::kNotJson, "malformed batch element");
    }
    // The element lies inside our padded buffer, so the bytes after it are readable padding.
    const size_t capacity = buffer_capacity_ - static_cast<size_t>(raw.data() - buffer_.get());
    ParseOne(/*element=*/true, raw, capacity, window);
  }
  if (!AtEnd(doc)) return reject_all(RejectReason::kNotJson, "trailing bytes after batch");
  if (count == 0) return reject_all(RejectReason::kEmptyBatch, "batch array is empty");
}

void EventParser::ParseOne(bool element, std::string_view bytes, size_t capacity,
                           const Window& window) {
  // Fast pass: strings are taken raw. A value with a JSON escape cannot pass the checks that
  // follow (UUID, RFC 3339, meter and industry names, "1.0" admit no backslash), so only a
  // refused event that holds a backslash is parsed again, decoding escapes.
  if (!ParseOneWith(element, bytes, capacity, window, /*decode_escapes=*/false)) {
    ParseOneWith(element, bytes, capacity, window, /*decode_escapes=*/true);
  }
}

bool EventParser::ParseOneWith(bool element, std::string_view bytes, size_t capacity,
                               const Window& window, bool decode_escapes) {
  od::parser& parser = element ? parsers_->element : parsers_->message;
  const StringReader read = decode_escapes ? &ReadString : &ReadRawString;
  Refusal refusal{RejectReason::kNotJson, ""};
  // Returns false (and records nothing) when the slow pass should decide instead.
  auto refuse = [&](RejectReason reason, std::string_view detail) {
    const bool value_check =
        reason == RejectReason::kBadSpecVersion || reason == RejectReason::kUnknownMeter ||
        reason == RejectReason::kBadOrgId || reason == RejectReason::kBadIndustry ||
        reason == RejectReason::kBadTime;
    if (!decode_escapes && value_check && bytes.find('\\') != std::string_view::npos) return false;
    result_.rejections.push_back({reason, detail, bytes});
    return true;
  };
  od::document doc;
  if (parser.iterate(bytes.data(), bytes.size(), capacity).get(doc) != simdjson::SUCCESS) {
    return refuse(RejectReason::kNotJson, "not parseable as JSON");
  }
  od::json_type type;
  if (doc.type().get(type) != simdjson::SUCCESS) {
    return refuse(RejectReason::kNotJson, "not parseable as JSON");
  }
  od::object object;
  if (type != od::json_type::object) {
    // Valid JSON of another shape is not_object; anything else is not_json.
    bool valid = false;
    switch (type) {
      case od::json_type::string:
        valid = doc.get_string().error() == simdjson::SUCCESS;
        break;
      case od::json_type::number:
        valid = doc.get_number().error() == simdjson::SUCCESS;
        break;
      case od::json_type::boolean:
        valid = doc.get_bool().error() == simdjson::SUCCESS;
        break;
      case od::json_type::null:
        valid = doc.is_null().value_unsafe();
        break;
      default:
        break;
    }
    if (!valid || !AtEnd(doc)) return refuse(RejectReason::kNotJson, "not parseable as JSON");
    return refuse(RejectReason::kNotObject, "event must be a JSON object");
  }
  if (doc.get_object().get(object) != simdjson::SUCCESS) {
    return refuse(RejectReason::kNotJson, "not parseable as JSON");
  }

  UsageEvent event;
  std::string_view spec_version, meter_name, subject, time_text;
  bool have_spec = false, have_id = false, have_source = false, have_type = false,
       have_subject = false, have_time = false, have_data = false;
  for (auto field : object) {
    // Keys compared raw: CloudEvents attribute names never need escaping.
    od::raw_json_string key;
    if (field.key().get(key) != simdjson::SUCCESS) {
      return refuse(RejectReason::kNotJson, "malformed object key");
    }
    auto read_string = [&](std::string_view* out, bool* have, std::string_view detail,
                           StringReader reader) {
      if (*have) {
        // Which one would count? Refused rather than guessed (JSON leaves it open).
        refusal = {RejectReason::kWrongType, "attribute given twice"};
        return false;
      }
      if (!reader(field.value(), out)) {
        refusal = {RejectReason::kWrongType, detail};
        return false;
      }
      *have = true;
      return true;
    };
    bool ok = true;
    switch (Classify(key.raw())) {
      case Attribute::kSpecVersion:
        ok = read_string(&spec_version, &have_spec, "specversion must be a string", read);
        break;
      case Attribute::kId:
        ok = read_string(&event.id, &have_id, "id must be a string", &ReadRawString);
        break;
      case Attribute::kSource:
        ok = read_string(&event.source, &have_source, "source must be a string", &ReadRawString);
        break;
      case Attribute::kType:
        ok = read_string(&meter_name, &have_type, "type must be a string", read);
        break;
      case Attribute::kSubject:
        ok = read_string(&subject, &have_subject, "subject must be a string", read);
        break;
      case Attribute::kTime:
        ok = read_string(&time_text, &have_time, "time must be a string", read);
        break;
      case Attribute::kData:
        if (have_data) {
          refusal = {RejectReason::kWrongType, "attribute given twice"};
          ok = false;
          break;
        }
        ok = ParseData(field.value(), &event, &refusal, read);
        have_data = true;
        break;
      case Attribute::kOther:
        break;
    }
    if (!ok) return refuse(refusal.reason, refusal.detail);
  }
  if (!AtEnd(doc)) return refuse(RejectReason::kNotJson, "trailing bytes after event");

  if (!have_spec) return refuse(RejectReason::kMissingField, "specversion");
  if (spec_version != "1.0")
    return refuse(RejectReason::kBadSpecVersion, "specversion must be 1.0");
  if (!have_id || event.id.empty()) return refuse(RejectReason::kMissingField, "id");
  if (!have_source || event.source.empty()) return refuse(RejectReason::kMissingField, "source");
  if (!have_type) return refuse(RejectReason::kMissingField, "type");
  if (!have_subject) return refuse(RejectReason::kMissingField, "subject");
  if (!have_time) return refuse(RejectReason::kMissingField, "time");
  if (!have_data) return refuse(RejectReason::kMissingField, "data");

  const auto meter = meters_->Lookup(meter_name);
  if (!meter) return refuse(RejectReason::kUnknownMeter, "type is not a meter in shared.meters");
  event.meter = meter->id;
  // The registry holds every maximum at or below MeterRegistry::kMaxEventQuantity, so this also
  // keeps a day's int64 sum from overflowing.
  if (event.quantity > meter->max_quantity) {
    return refuse(RejectReason::kQuantityTooLarge,
                  "data.quantity is above the meter's max_event_quantity");
  }
  auto org = ParseOrgId(subject);
  if (!org) return refuse(RejectReason::kBadOrgId, "subject must be an organization UUID");
  event.org = *org;
  auto micros = ParseRfc3339Micros(time_text);
  if (!micros) return refuse(RejectReason::kBadTime, "time must be RFC 3339");
  if (*micros > window.max_micros) {
    return refuse(RejectReason::kTimeInFuture, "time is ahead of the consumer clock");
  }
  if (*micros < window.min_micros) {
    return refuse(RejectReason::kTimeTooOld, "time is older than the late window");
  }
  event.time_micros = *micros;
  result_.events.push_back(event);
  return true;
}

}  // namespace meterd::event
