#include "transfer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdio>
#include <ranges>
#include <sstream>

#include "dtrain/common/error.h"

namespace dtrain::cli {

namespace {

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// --freeze: the prefixes ("base" = every parameter outside the head).
int64_t freeze(const std::string& spec, nn::Module& model) {
  const std::string head = head_prefix(model);
  int64_t frozen = 0;
  for (const std::string& prefix : split_commas(spec)) {
    int64_t matched = 0;
    for (auto& [name, p] : model.named_parameters()) {
      const bool hit = prefix == "base" ? name.rfind(head, 0) != 0 : name.rfind(prefix, 0) == 0;
      if (!hit) continue;
      if (p.requires_grad()) frozen += p.numel();
      p.set_requires_grad(false);
      ++matched;
    }
    DTRAIN_CHECK(matched > 0, InvalidArgument,
                 "--freeze {}: no parameter of {} starts with it (its parameters: {})", prefix,
                 model.type_name(), fmt::join(model.state_dict() | std::views::keys, ", "));
  }
  return frozen;
}

}  // namespace

std::string head_prefix(const nn::Module& model) {
  std::string head;
  for (const auto& [name, child] : model.named_children()) {
    if (child->num_parameters() > 0) head = name;
  }
  DTRAIN_CHECK(!head.empty(), InvalidArgument, "{} has no layer with parameters",
               model.type_name());
  return head + ".";
}

nn::ImportOptions import_options(const TransferOptions& t, const nn::Module& model) {
  nn::ImportOptions o;
  if (!t.name_map.empty()) o.names = nn::read_name_map(t.name_map);
  for (const std::string& rule : split_commas(t.name_prefix)) {
    o.names.prefixes.push_back(nn::parse_prefix_rule(rule));
  }
  if (t.reset_head) o.keep_fresh.push_back(head_prefix(model));
  return o;
}

std::string apply_transfer(const TransferOptions& t, nn::Module& model) {
  DTRAIN_CHECK(!t.reset_head || !t.init_from.empty(), InvalidArgument,
               "--reset-head needs --init-from (the weights whose head is reset)");
  DTRAIN_CHECK((t.name_map.empty() && t.name_prefix.empty()) || !t.init_from.empty(),
               InvalidArgument, "--name-map and --name-prefix need --init-from");
  std::string line;
  if (!t.init_from.empty()) {
    nn::ImportReport r = nn::load_safetensors(model, t.init_from, import_options(t, model));
    line = fmt::format(
        "init: {} tensors from {}{}", r.loaded.size(), t.init_from,
        t.reset_head ? fmt::format(" (head {} freshly initialised)", head_prefix(model)) : "");
  }
  if (!t.freeze.empty()) {
    int64_t n = freeze(t.freeze, model);
    line += fmt::format("{}frozen: {} of {} parameters ({})", line.empty() ? "" : "; ", n,
                        model.num_parameters(), t.freeze);
  }
  return line;
}

std::vector<int64_t> parse_classes(const std::string& spec) {
  std::vector<int64_t> out;
  for (const std::string& item : split_commas(spec)) {
    int lo = -1, hi = -1;
    char tail = 0;
    const int n = std::sscanf(item.c_str(), "%d-%d%c", &lo, &hi, &tail);
    if (n == 1 && item.find('-') == std::string::npos) hi = lo;
    DTRAIN_CHECK((n == 1 || n == 2) && lo >= 0 && hi >= lo && hi <= 9, InvalidArgument,
                 "--classes {}: expected digits or ranges in 0..9, e.g. 0-4 or 5,7,9 (at '{}')",
                 spec, item);
    for (int c = lo; c <= hi; ++c) out.push_back(c);
  }
  DTRAIN_CHECK(!spec.empty() == !out.empty(), InvalidArgument, "--classes '{}': no class", spec);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::shared_ptr<const data::Dataset> filter_classes(std::shared_ptr<const data::Dataset> d,
                                                    const std::vector<int64_t>& classes,
                                                    const std::string& what) {
  if (classes.empty()) return d;
  std::vector<int64_t> all(static_cast<size_t>(d->size()));
  for (int64_t i = 0; i < d->size(); ++i) all[static_cast<size_t>(i)] = i;
  const data::Batch b = d->get_batch(all);
  const Tensor labels = b.target.contiguous();
  const int64_t* y = labels.data<int64_t>();
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < d->size(); ++i) {
    if (std::binary_search(classes.begin(), classes.end(), y[i])) rows.push_back(i);
  }
  DTRAIN_CHECK(!rows.empty(), InvalidArgument, "--classes: the {} split has no sample of {}", what,
               fmt::join(classes, ","));
  return std::make_shared<data::TensorDataset>(data::gather_rows(b.input.contiguous(), rows),
                                               data::gather_rows(labels, rows));
}

}  // namespace dtrain::cli
