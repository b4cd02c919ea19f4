#include "lib/kafka/fake_partition_source.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace meterd::kafka {

class FakePartitionSource::Queue final : public MessageQueue {
 public:
  explicit Queue(FakePartitionSource* source) : source_(source) {}

  void NotifyOn(int fd) override {
    std::lock_guard lock(source_->mu_);
    fd_ = fd;
    empty_ = true;
    source_->NotifyLocked(this);
  }

  std::span<const Message> Poll(size_t max) override {
    std::lock_guard lock(source_->mu_);
    messages_.clear();
    scratch_.clear();
    scratch_.reserve(max);  // Views into it must not move while the batch grows.
    std::vector<int32_t> mine;
    for (size_t i = 0; i < source_->partitions_.size(); ++i) {
      if (source_->partitions_[i].queue == this && source_->partitions_[i].assigned) {
        mine.push_back(static_cast<int32_t>(i));
      }
    }
    // Round robin over the partitions, so one endless partition does not hide the others.
    for (size_t turn = 0; turn < mine.size() && messages_.size() < max; ++turn) {
      const int32_t id = mine[(next_ + turn) % mine.size()];
      Partition& p = source_->partitions_[id];
      const size_t share = std::max<size_t>(1, (max - messages_.size()) / (mine.size() - turn));
      for (size_t taken = 0; taken < share && messages_.size() < max; ++taken) {
        if (p.position < p.log_start || p.position > source_->LogEndLocked(p)) {
          if (!p.out_of_range_reported) {
            p.out_of_range_reported = true;
            Message& m = messages_.emplace_back();
            m.status = Message::Status::kOutOfRange;
            m.partition = id;
            m.offset = p.position;
            m.error = "fake: offset out of range";
          }
          break;
        }
        Message& m = messages_.emplace_back();
        m.partition = id;
        m.offset = p.position;
        if (p.position < static_cast<int64_t>(p.log.size())) {
          const StoredMessage& stored = p.log[p.position];
          m.value = stored.value.data();
          m.size = stored.value.size();
          m.timestamp_ms = stored.timestamp_ms;
        } else if (p.endless) {
          const std::string& value = scratch_.emplace_back(p.endless(p.position));
          m.value = value.data();
          m.size = value.size();
          p.generated_end = std::max(p.generated_end, p.position + 1);
        } else {
          messages_.pop_back();
          break;
        }
        ++p.position;
      }
    }
    next_ = mine.empty() ? 0 : (next_ + 1) % mine.size();
    bool more = false;
    for (int32_t id : mine) more = more || source_->HasDataLocked(source_->partitions_[id]);
    empty_ = !more;
    return messages_;
  }

 private:
  friend class FakePartitionSource;
  FakePartitionSource* const source_;
  int fd_ = -1;        // Guarded by source_->mu_.
  bool empty_ = true;  // Guarded by source_->mu_: no byte written since the last dry Poll.
  size_t next_ = 0;
  std::vector<Message> messages_;
  std::vector<std::string> scratch_;  // Endless messages of the last batch.
};

FakePartitionSource::FakePartitionSource(int partitions) : partitions_(partitions) {}
FakePartitionSource::~FakePartitionSource() = default;

int64_t FakePartitionSource::LogEndLocked(const Partition& p) const {
  return std::max(static_cast<int64_t>(p.log.size()), p.generated_end);
}

bool FakePartitionSource::HasDataLocked(const Partition& p) const {
  if (!p.assigned || p.queue == nullptr) return false;
  if (p.position < p.log_start || p.position > LogEndLocked(p)) return !p.out_of_range_reported;
  return p.endless || p.position < static_cast<int64_t>(p.log.size());
}

void FakePartitionSource::NotifyLocked(Queue* queue) {
  if (queue == nullptr || queue->fd_ < 0 || !queue->empty_) return;
  for (const Partition& p : partitions_) {
    if (p.queue == queue && HasDataLocked(p)) {
      queue->empty_ = false;
      const char byte = '1';
      (void)!write(queue->fd_, &byte, 1);
      return;
    }
  }
}

int64_t FakePartitionSource::Append(int32_t partition, std::string value, int64_t timestamp_ms) {
  std::lock_guard lock(mu_);
  Partition& p = partitions_.at(partition);
  p.log.push_back({std::move(value), timestamp_ms});
  NotifyLocked(p.queue);
  return static_cast<int64_t>(p.log.size()) - 1;
}

void FakePartitionSource::MakeEndless(int32_t partition,
                                      std::function<std::string(int64_t offset)> make) {
  std::lock_guard lock(mu_);
  Partition& p = partitions_.at(partition);
  p.endless = std::move(make);
  NotifyLocked(p.queue);
}

void FakePartitionSource::DeleteBefore(int32_t partition, int64_t offset) {
  std::lock_guard lock(mu_);
  Partition& p = partitions_.at(partition);
  p.log_start = std::max(p.log_start, offset);
  NotifyLocked(p.queue);
}

void FakePartitionSource::Assign(std::vector<int32_t> partitions) {
  std::lock_guard lock(mu_);
  events_.push_back({true, std::move(partitions), false});
  events_cv_.notify_all();
}

void FakePartitionSource::Revoke(std::vector<int32_t> partitions, bool lost) {
  std::lock_guard lock(mu_);
  events_.push_back({false, std::move(partitions), lost});
  events_cv_.notify_all();
}

void FakePartitionSource::FailSeeks(int n) {
  std::lock_guard lock(mu_);
  failing_seeks_ = n;
}

int64_t FakePartitionSource::Position(int32_t partition) const {
  std::lock_guard lock(mu_);
  return partitions_.at(partition).position;
}

int64_t FakePartitionSource::seeks() const {
  std::lock_guard lock(mu_);
  return seeks_;
}

absl::StatusOr<std::unique_ptr<MessageQueue>> FakePartitionSource::NewQueue() {
  return std::make_unique<Queue>(this);
}

void FakePartitionSource::Route(int32_t partition, MessageQueue* queue) {
  std::lock_guard lock(mu_);
  partitions_.at(partition).queue = static_cast<Queue*>(queue);
}

absl::Status FakePartitionSource::Subscribe(GroupListener* listener) {
  std::lock_guard lock(mu_);
  listener_ = listener;
  return absl::OkStatus();
}

PollEvent FakePartitionSource::Poll(absl::Duration timeout) {
  GroupEvent event;
  GroupListener* listener;
  {
    std::unique_lock lock(mu_);
    if (!events_cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                             [&] { return !events_.empty(); })) {
      return {};
    }
    event = std::move(events_.front());
    events_.pop_front();
    listener = listener_;
  }
  // The listener runs unlocked: it routes, seeks and reads bounds.
  if (event.assign) {
    std::vector<AssignedPartition> assigned;
    for (int32_t partition : event.partitions) assigned.push_back({partition});
    if (!listener->OnAssign(assigned)) return {};
    std::lock_guard lock(mu_);
    for (const AssignedPartition& a : assigned) {
      Partition& p = partitions_.at(a.partition);
      p.assigned = true;
      p.position = a.start_offset == kOffsetBeginning ? p.log_start : a.start_offset;
      p.out_of_range_reported = false;
      NotifyLocked(p.queue);
    }
  } else {
    listener->OnRevoke(event.partitions, event.lost);
    std::lock_guard lock(mu_);
    for (int32_t partition : event.partitions) {
      partitions_.at(partition).assigned = false;
      partitions_.at(partition).queue = nullptr;
    }
  }
  return {};
}

absl::Status FakePartitionSource::Close() {
  std::vector<int32_t> assigned;
  GroupListener* listener;
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < partitions_.size(); ++i) {
      if (partitions_[i].assigned) assigned.push_back(static_cast<int32_t>(i));
    }
    listener = listener_;
  }
  if (listener != nullptr && !assigned.empty()) listener->OnRevoke(assigned, false);
  std::lock_guard lock(mu_);
  for (int32_t partition : assigned) {
    partitions_[partition].assigned = false;
    partitions_[partition].queue = nullptr;
  }
  return absl::OkStatus();
}

absl::Status FakePartitionSource::Seek(int32_t partition, int64_t offset) {
  std::lock_guard lock(mu_);
  ++seeks_;
  if (failing_seeks_ > 0) {
    --failing_seeks_;
    return absl::UnavailableError("fake: seek refused");
  }
  Partition& p = partitions_.at(partition);
  p.position = offset == kOffsetBeginning ? p.log_start : offset;
  p.out_of_range_reported = false;
  NotifyLocked(p.queue);
  return absl::OkStatus();
}

absl::Status FakePartitionSource::LogBounds(int32_t partition, int64_t* low, int64_t* high) {
  std::lock_guard lock(mu_);
  const Partition& p = partitions_.at(partition);
  *low = p.log_start;
  *high = LogEndLocked(p);
  return absl::OkStatus();
}

int64_t FakePartitionSource::CachedLogEnd(int32_t partition) const {
  std::lock_guard lock(mu_);
  return LogEndLocked(partitions_.at(partition));
}

int FakePartitionSource::AssignedCount() const {
  std::lock_guard lock(mu_);
  int n = 0;
  for (const Partition& p : partitions_) n += p.assigned ? 1 : 0;
  return n;
}

}  // namespace meterd::kafka
